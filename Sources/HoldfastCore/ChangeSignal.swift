import NIOConcurrencyHelpers

/// "Something changed": wakes every waiter, so a loop waiting for a condition re-checks it
/// when it may have become true instead of polling. The generation closes the gap between a
/// check and the wait: read it before checking, and a change in between ends the wait at once.
/// Waits are bounded through the shared `TimeoutWheel` (no sleeping task left behind).
public final class ChangeSignal: Sendable {
    private struct State {
        var generation: UInt64 = 0
        var nextWaiter: UInt64 = 0
        var waiters: [UInt64: (continuation: CheckedContinuation<Void, Never>, timeout: TimeoutWheel.Token?)] = [:]
    }
    private let state = NIOLockedValueBox(State())
    private let wheel: TimeoutWheel

    public init(wheel: TimeoutWheel = .shared) {
        self.wheel = wheel
    }

    /// Read before checking the condition; pass to `wait(since:timeout:)`.
    public var generation: UInt64 { state.withLockedValue { $0.generation } }

    /// Wakes every waiter.
    public func notify() {
        let waiters = state.withLockedValue { s in
            s.generation &+= 1
            defer { s.waiters.removeAll() }
            return Array(s.waiters.values)
        }
        for waiter in waiters {
            if let timeout = waiter.timeout { wheel.cancel(timeout) }
            waiter.continuation.resume()
        }
    }

    /// Returns once a change after `generation` happened, or after `timeout`.
    public func wait(since generation: UInt64, timeout: Duration) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let id = state.withLockedValue { s -> UInt64? in
                guard s.generation == generation else { return nil }
                s.nextWaiter &+= 1
                s.waiters[s.nextWaiter] = (continuation, nil)
                return s.nextWaiter
            }
            guard let id else {
                continuation.resume()
                return
            }
            let token = wheel.schedule(after: timeout) { [state] in
                state.withLockedValue { $0.waiters.removeValue(forKey: id) }?.continuation.resume()
            }
            // Kept so that a notify cancels it (unless it fired or the notify came first).
            state.withLockedValue { s in if s.waiters[id] != nil { s.waiters[id]?.timeout = token } }
        }
    }
}
