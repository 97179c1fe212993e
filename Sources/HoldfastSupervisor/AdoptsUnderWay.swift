import HoldfastCore
import HoldfastProtocol
import NIOConcurrencyHelpers

/// The broker's adopt of each create's process, while it is awaited (`startProcess`).
///
/// The adopt itself has no bound — a broker restarting is waited for, and an adopt a broker died
/// inside goes to its successor — but the create's wait for it has one (`bound`). Without it, a
/// broker an operator stopped or held in a debugger held every create that came meanwhile, and
/// the bridge worker's permit each create holds: 32 creates (a host starting its containers
/// while someone debugged the broker) and the worker stopped reading the host's connection —
/// signals, stops, exits' acknowledgements and, after a migration, the next hello waited too.
/// A wait past its bound is answered `.late`: the process has started and its stdio waits in
/// its pipes, as every other process's does while the broker stands still, and the adopt goes on
/// (the caller is handed it, to learn its result). While one adopt is late, the next create does not
/// wait at all (the broker has not answered the last one), as the host's other requests to a
/// stopped broker are answered at once once one of their kind is overdue.
///
/// At the stop's drains' end, the stop ends every wait still within its bound (`endAll`): the
/// create fails as `shutting-down` and ends its process, and its answer goes out before the
/// bridge worker stops.
final class AdoptsUnderWay: Sendable {
    /// What became of a create's wait for its adopt.
    enum Outcome: Sendable {
        case adopted
        /// Not answered within the bound: the adopt goes on; its result, once it has one.
        case late(Task<Result<Void, HoldfastError>, Never>)
    }

    private typealias Waiter = CheckedContinuation<Result<Outcome, HoldfastError>, Never>

    private struct State {
        var next: UInt64 = 0
        var waiting: [UInt64: Waiter] = [:]
        /// Adopts whose waits were answered `.late` and that have not finished.
        var late: Set<UInt64> = []
        var ended = false
    }

    private let state = NIOLockedValueBox(State())
    private let wheel: TimeoutWheel

    init(wheel: TimeoutWheel = .shared) {
        self.wheel = wheel
    }

    /// Adopts answered `.late` that have not finished yet.
    var lateCount: Int { state.withLockedValue { $0.late.count } }

    /// Awaits `adopt` at most `bound` (at once `.late` while another adopt is late): its result,
    /// `.late`, or `shutting-down` if the stop ends the wait first (the adopt itself goes on, its
    /// answer then unread).
    /// `notStarted` runs when the stop's end came first and `adopt` never ran (what it would
    /// have sent and closed is the caller's to close).
    func await(
        within bound: Duration, notStarted: @Sendable () -> Void = {}, _ adopt: @escaping @Sendable () async throws(HoldfastError) -> Void
    ) async throws(HoldfastError) -> Outcome {
        let result = await withCheckedContinuation { (waiter: Waiter) in
            let registered = state.withLockedValue { s -> (key: UInt64, behindALateOne: Bool)? in
                guard !s.ended else { return nil }
                s.next &+= 1
                s.waiting[s.next] = waiter
                return (s.next, !s.late.isEmpty)
            }
            guard let registered else {
                notStarted()
                return waiter.resume(returning: .failure(Self.endedByTheStop))
            }
            let key = registered.key
            let adopting = Task { () async -> Result<Void, HoldfastError> in
                do throws(HoldfastError) {
                    try await adopt()
                    return .success(())
                } catch {
                    return .failure(error)
                }
            }
            let timeout = wheel.schedule(after: registered.behindALateOne ? .zero : bound) { [state] in
                let waiter = state.withLockedValue { s -> Waiter? in
                    guard let waiter = s.waiting.removeValue(forKey: key) else { return nil }
                    s.late.insert(key)
                    return waiter
                }
                waiter?.resume(returning: .success(.late(adopting)))
            }
            Task { [state, wheel] in
                let result = await adopting.value
                wheel.cancel(timeout)
                let waiter = state.withLockedValue { s in
                    s.late.remove(key)
                    return s.waiting.removeValue(forKey: key)
                }
                waiter?.resume(returning: result.map { .adopted })
            }
        }
        return try result.get()
    }

    /// Ends every wait within its bound, and every one to come, with `shutting-down`; returns
    /// how many it ended. Late adopts are left to finish: their processes are in the table, for
    /// the stop to end.
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
