import HoldfastProtocol
import NIOConcurrencyHelpers

/// The outcome of a request still being carried out, which repeats of that request wait for:
/// a create's start (`CreateLedger`), a signal's delivery (`SignalLedger`). Resolved once.
final class PendingOutcome<Value: Sendable>: Sendable {
    let key: String?
    private let outcome = NIOLockedValueBox<(result: Result<Value, HoldfastError>?, waiters: [CheckedContinuation<Result<Value, HoldfastError>, Never>])>(
        (nil, []))

    init(key: String?) { self.key = key }

    func resolve(_ result: Result<Value, HoldfastError>) {
        let waiters = outcome.withLockedValue { o -> [CheckedContinuation<Result<Value, HoldfastError>, Never>] in
            o.result = result
            defer { o.waiters.removeAll() }
            return o.waiters
        }
        for waiter in waiters { waiter.resume(returning: result) }
    }

    /// Repeats waiting for the outcome now.
    var waiting: Int { outcome.withLockedValue { $0.waiters.count } }

    func wait() async -> Result<Value, HoldfastError> {
        await withCheckedContinuation { continuation in
            let known = outcome.withLockedValue { o -> Result<Value, HoldfastError>? in
                if let result = o.result { return result }
                o.waiters.append(continuation)
                return nil
            }
            if let known { continuation.resume(returning: known) }
        }
    }
}
