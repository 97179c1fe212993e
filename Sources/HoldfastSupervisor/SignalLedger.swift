import HoldfastProtocol

/// What makes a signal safe to send again (docs/PROTOCOL.md, "Repeating a signal").
///
/// A host whose bridge drops before a signal's reply cannot know whether the signal was sent,
/// and sends it again. Delivered twice, it is not the same request: to many programs a second
/// SIGINT or SIGTERM means "now, without the graceful part" (a shell's second Ctrl-C, servers
/// that skip their shutdown on the second). A signal that carries an idempotency key is
/// recognised by it: while the first is being sent (the repeat waits for its outcome), once it
/// was sent (the process keeps its last `keysPerProcess` keys), and after the process was
/// forgotten (the last `capacity` keys of forgotten processes are kept: a SIGKILL's repeat can
/// come after the exit it caused was acknowledged, and a new process may have the id by then).
/// All of it but what is under way goes across a live upgrade. A signal that failed is not
/// remembered: sending it again is a new attempt.
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

    /// A signal to a process by its key (under way, or remembered after the process was
    /// forgotten, as a snapshot keeps it).
    struct Keyed: Codable, Hashable, Sendable {
        var process: String
        var key: String
    }

    /// How many keys of forgotten processes' signals are remembered.
    let capacity: Int
    private var underWay: [Keyed: PendingSignal] = [:]
    private var remembered: RecentlyKept<Keyed, Void>

    init(capacity: Int = 4096) {
        self.capacity = capacity
        remembered = RecentlyKept(capacity: capacity)
    }

    /// A ledger that remembers what a snapshot listed, in the same order.
    init(capacity: Int = 4096, restoring entries: [Keyed]) {
        self.init(capacity: capacity)
        for entry in entries { remembered.keep((), for: entry) }
    }

    /// The keys of forgotten processes' signals, oldest first (what a snapshot keeps).
    var rememberedInOrder: [Keyed] { remembered.inOrder.map(\.key) }
    var rememberedCount: Int { remembered.count }

    /// Signals being sent now (their repeats would wait).
    var underWayCount: Int { underWay.count }

    /// `sent` is the keys the process keeps of signals already sent to it.
    mutating func decide(process: String, key: String?, sent: [String]?) -> Decision {
        guard let key else { return .send(nil) }
        let keyed = Keyed(process: process, key: key)
        if sent?.contains(key) == true || remembered[keyed] != nil { return .repeated }
        if let pending = underWay[keyed] { return .join(pending) }
        let pending = PendingSignal(key: key)
        underWay[keyed] = pending
        return .send(pending)
    }

    /// The signal is no longer being sent (its outcome goes to `pending`'s waiters).
    mutating func settled(process: String, key: String) {
        underWay.removeValue(forKey: Keyed(process: process, key: key))
    }

    /// The process was forgotten: the keys of the signals sent to it are remembered here.
    mutating func forgotten(process: String, keys: [String]?) {
        for key in keys ?? [] { remembered.keep((), for: Keyed(process: process, key: key)) }
    }

    /// Adds a sent signal's key to a process's, the oldest dropped past `keysPerProcess`.
    static func keep(_ key: String, in keys: inout [String]?) {
        var kept = keys ?? []
        kept.append(key)
        if kept.count > keysPerProcess { kept.removeFirst(kept.count - keysPerProcess) }
        keys = kept
    }
}
