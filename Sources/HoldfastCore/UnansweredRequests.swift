import NIOConcurrencyHelpers

/// A served connection's requests from their arrival to their reply's write (`RPCServer.serve`
/// counts them when given one): a server about to go — the bridge worker at a daemon stop —
/// waits until every reply it owes is written, instead of taking them down with it.
public final class UnansweredRequests: Sendable {
    private let state = NIOLockedValueBox(State())

    private struct State {
        var count = 0
        var waiters: [CheckedContinuation<Void, Never>] = []
    }

    public init() {}

    /// Requests read and not yet answered now.
    public var count: Int { state.withLockedValue { $0.count } }

    func arrived() {
        state.withLockedValue { $0.count += 1 }
    }

    func answered() {
        let waiters = state.withLockedValue { state -> [CheckedContinuation<Void, Never>] in
            state.count -= 1
            precondition(state.count >= 0, "a request answered twice")
            guard state.count == 0 else { return [] }
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Returns once no request is unanswered (at once if none is). Requests that keep coming
    /// can keep it waiting: the caller bounds it.
    public func waitUntilNone() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let none = state.withLockedValue { state -> Bool in
                guard state.count > 0 else { return true }
                state.waiters.append(continuation)
                return false
            }
            if none { continuation.resume() }
        }
    }
}
