/// Says a recurring event at once the first time, then at most once per `interval` for each
/// key, with how many went unsaid in between: a log line an outsider can provoke (a signal sent
/// in a loop, SIGXCPU every second past a soft CPU limit) must not flood the journal.
public struct LogPacer<Key: Hashable & Sendable>: Sendable {
    public let interval: Duration
    private var lastSaid: [Key: ContinuousClock.Instant] = [:]
    private var unsaid: [Key: Int] = [:]

    public init(interval: Duration) {
        self.interval = interval
    }

    /// An occurrence of `key` at `now`: nil if it is not to be said now (it is counted), else how
    /// many occurrences since the last one said went unsaid (0 the first time).
    public mutating func note(_ key: Key, at now: ContinuousClock.Instant = .now) -> Int? {
        if let last = lastSaid[key], now - last < interval {
            unsaid[key, default: 0] += 1
            return nil
        }
        lastSaid[key] = now
        // Keys of the past (a process long gone) are let go, so a pacer keyed by something
        // others choose stays small: one said over an interval ago is said at once anyway.
        // A key with occurrences still unsaid is kept (its next line says how many), unless the
        // pacer holds four times as many.
        if lastSaid.count > Self.keysKept {
            let keepUnsaid = lastSaid.count <= 4 * Self.keysKept
            lastSaid = lastSaid.filter { now - $0.value < interval || (keepUnsaid && unsaid[$0.key] != nil) }
            unsaid = unsaid.filter { lastSaid[$0.key] != nil }
        }
        return unsaid.removeValue(forKey: key) ?? 0
    }

    /// The keys it holds.
    public var keyCount: Int { lastSaid.count }

    /// Past this many keys, those said over an interval ago are forgotten.
    static var keysKept: Int { 1024 }
}
