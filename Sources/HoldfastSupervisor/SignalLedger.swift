import HoldfastProtocol

/// What makes a signal safe to send again (docs/PROTOCOL.md, "Repeating a signal").
///
/// A host whose bridge drops before a signal's reply cannot know whether the signal was sent,
/// and sends it again. Delivered twice, it is not the same request: to many programs a second
/// SIGINT or SIGTERM means "now, without the graceful part" (a shell's second Ctrl-C, servers
/// that skip their shutdown on the second). A signal that carries an idempotency key is
/// recognised by it: while the first is being sent (the repeat waits for its outcome) and once
/// it was sent (the process keeps its last `keysPerProcess` keys, which go with it across a
/// live upgrade). A signal that failed is not remembered: sending it again is a new attempt.
///
/// Pure bookkeeping, kept under the process table's lock: "was it sent" and "it is being sent
/// now" are one step.
struct SignalLedger {
    typealias PendingSignal = PendingOutcome<Void>

    /// How many sent signals' keys a process keeps (a host repeats one at most a few times,
    /// right after a connection was lost).
    static let keysPerProcess = 64

    enum Decision {
        /// Send it; then settle it with its outcome (`pending` is nil for a signal without a key).
        case send(PendingSignal?)
        /// The same signal (same process and key) is being sent: its outcome is this one's.
        case join(PendingSignal)
        /// The same signal was sent already.
        case repeated
    }

    private struct UnderWay: Hashable {
        var process: String
        var key: String
    }

    private var underWay: [UnderWay: PendingSignal] = [:]

    /// Signals being sent now (their repeats would wait).
    var underWayCount: Int { underWay.count }

    /// `sent` is the keys the process keeps of signals already sent to it.
    mutating func decide(process: String, key: String?, sent: [String]?) -> Decision {
        guard let key else { return .send(nil) }
        if sent?.contains(key) == true { return .repeated }
        if let pending = underWay[UnderWay(process: process, key: key)] { return .join(pending) }
        let pending = PendingSignal(key: key)
        underWay[UnderWay(process: process, key: key)] = pending
        return .send(pending)
    }

    /// The signal is no longer being sent (its outcome goes to `pending`'s waiters).
    mutating func settled(process: String, key: String) {
        underWay.removeValue(forKey: UnderWay(process: process, key: key))
    }

    /// Adds a sent signal's key to a process's, the oldest dropped past `keysPerProcess`.
    static func remember(_ key: String, in keys: inout [String]?) {
        var kept = keys ?? []
        kept.append(key)
        if kept.count > keysPerProcess { kept.removeFirst(kept.count - keysPerProcess) }
        keys = kept
    }
}
