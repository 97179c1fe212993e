import HoldfastProtocol
import NIOConcurrencyHelpers

/// The broker's adopt of each create's process, while it is awaited (`startProcess`). It has no
/// bound of its own — a broker restarting is waited for, and an adopt a broker died inside goes
/// to its successor — so a broker an operator holds in a debugger (which SIGCONT does not end)
/// held the create past the stop's drains: its process was killed by the stop's cgroup sweep,
/// its answer never reached the host (the host's own timeout said `no-guest`). At the drains'
/// end the stop ends every such wait (`endAll`): the create fails as `shutting-down` and ends
/// its process, and its answer goes out before the bridge worker stops.
final class AdoptsUnderWay: Sendable {
    private typealias Waiter = CheckedContinuation<Result<Void, HoldfastError>, Never>

    private struct State {
        var next: UInt64 = 0
        var waiting: [UInt64: Waiter] = [:]
        var ended = false
    }

    private let state = NIOLockedValueBox(State())

    /// Awaits `adopt`: its result, or `shutting-down` if the stop ends the wait first (the adopt
    /// itself goes on, its answer then unread).
    func await(_ adopt: @escaping @Sendable () async throws(HoldfastError) -> Void) async throws(HoldfastError) {
        let result = await withCheckedContinuation { (waiter: Waiter) in
            let key = state.withLockedValue { s -> UInt64? in
                guard !s.ended else { return nil }
                s.next &+= 1
                s.waiting[s.next] = waiter
                return s.next
            }
            guard let key else { return waiter.resume(returning: .failure(Self.endedByTheStop)) }
            Task {
                let result: Result<Void, HoldfastError>
                do throws(HoldfastError) {
                    try await adopt()
                    result = .success(())
                } catch {
                    result = .failure(error)
                }
                state.withLockedValue { $0.waiting.removeValue(forKey: key) }?.resume(returning: result)
            }
        }
        try result.get()
    }

    /// Ends every wait, and every one to come, with `shutting-down`; returns how many it ended.
    func endAll() -> Int {
        let waiters = state.withLockedValue { s -> [Waiter] in
            s.ended = true
            defer { s.waiting = [:] }
            return Array(s.waiting.values)
        }
        for waiter in waiters { waiter.resume(returning: .failure(Self.endedByTheStop)) }
        return waiters.count
    }

    static let endedByTheStop = HoldfastError(
        .shuttingDown, "the daemon stopped while the broker was adopting the process (the broker did not answer: held in a debugger?)")
}
