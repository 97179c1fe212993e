import NIOConcurrencyHelpers

/// At most `capacity` requests of one peer in progress at a time. A reader takes a permit before
/// it reads the next request, so a peer that pipelines faster than its requests are answered —
/// or than it reads the replies — stops being read: the kernel's socket buffers fill and the
/// peer blocks in its own `write(2)`. Back-pressure instead of a task and a reply per request
/// queued in our memory.
public final class RequestLimit: Sendable {
    public let capacity: Int
    private let state: NIOLockedValueBox<State>

    private struct State {
        var available: Int
        var waiters: [CheckedContinuation<Void, Never>] = []
    }

    public init(capacity: Int) {
        precondition(capacity > 0, "a request limit needs room for one request")
        self.capacity = capacity
        state = NIOLockedValueBox(State(available: capacity))
    }

    /// Waits for a permit. Waiters are served in order.
    public func acquire() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let granted = state.withLockedValue { state -> Bool in
                if state.available > 0 {
                    state.available -= 1
                    return true
                }
                state.waiters.append(continuation)
                return false
            }
            if granted { continuation.resume() }
        }
    }

    /// Gives a permit back: to the first waiter, if any.
    public func release() {
        let next = state.withLockedValue { state -> CheckedContinuation<Void, Never>? in
            if state.waiters.isEmpty {
                state.available += 1
                precondition(state.available <= capacity, "a permit released twice")
                return nil
            }
            return state.waiters.removeFirst()
        }
        next?.resume()
    }

    /// Permits in use now (for tests and metrics).
    public var inUse: Int { state.withLockedValue { capacity - $0.available } }
}
