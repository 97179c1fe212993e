import NIOConcurrencyHelpers

/// A value that comes and goes — a role's control client, absent while the role restarts — for
/// which callers may wait, bounded, instead of failing at once or polling.
public final class Rendezvous<Value: Sendable>: Sendable {
    private struct State {
        var value: Value?
        var waiters: [UInt64: CheckedContinuation<Value?, Never>] = [:]
        var nextWaiter: UInt64 = 0
    }

    private let state: NIOLockedValueBox<State>
    private let wheel: TimeoutWheel

    public init(_ value: Value? = nil, wheel: TimeoutWheel = .shared) {
        state = NIOLockedValueBox(State(value: value))
        self.wheel = wheel
    }

    /// The value now, if there is one.
    public var current: Value? { state.withLockedValue { $0.value } }

    /// Sets (or clears) the value; a value wakes everyone waiting for one.
    public func set(_ value: Value?) {
        let waiters = state.withLockedValue { s -> [CheckedContinuation<Value?, Never>] in
            s.value = value
            guard value != nil else { return [] }
            defer { s.waiters.removeAll() }
            return Array(s.waiters.values)
        }
        for waiter in waiters { waiter.resume(returning: value) }
    }

    /// Clears the value only if `isCurrent` says the one held is the caller's (a newer one may
    /// have replaced it already).
    public func clear(if isCurrent: (Value) -> Bool) {
        state.withLockedValue { s in
            if let value = s.value, isCurrent(value) { s.value = nil }
        }
    }

    /// The value, waiting up to `timeout` for one; nil if none came.
    public func wait(timeout: Duration) async -> Value? {
        await withCheckedContinuation { (continuation: CheckedContinuation<Value?, Never>) in
            let (ready, id) = state.withLockedValue { s -> (Value??, UInt64) in
                if let value = s.value { return (.some(value), 0) }
                s.nextWaiter &+= 1
                s.waiters[s.nextWaiter] = continuation
                return (nil, s.nextWaiter)
            }
            if let ready {
                continuation.resume(returning: ready)
                return
            }
            wheel.schedule(after: timeout) { [state] in
                state.withLockedValue { $0.waiters.removeValue(forKey: id) }?.resume(returning: nil)
            }
        }
    }
}
