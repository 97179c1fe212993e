/// How a ConnSlot redials after it lost its connection.
///
/// One *cycle* is at most `attempts` dials, each bounded by `connectTimeout` (so a dial that hangs
/// still counts and the cycle's length is real), separated by `interval`, which grows by
/// `multiplier` up to `maxInterval`. The defaults are the original design's 60 × 100 ms.
public struct RedialPolicy: Sendable, Equatable {
    public var attempts: Int
    public var interval: Duration
    public var multiplier: Double
    public var maxInterval: Duration
    public var connectTimeout: Duration

    public init(
        attempts: Int = 60,
        interval: Duration = .milliseconds(100),
        multiplier: Double = 1.0,
        maxInterval: Duration = .seconds(5),
        connectTimeout: Duration = .seconds(2)
    ) {
        precondition(attempts >= 1, "a redial cycle makes at least one attempt")
        precondition(multiplier >= 1.0, "the redial interval never shrinks")
        self.attempts = attempts
        self.interval = interval
        self.multiplier = multiplier
        self.maxInterval = maxInterval
        self.connectTimeout = connectTimeout
    }

    public static let `default` = RedialPolicy()

    /// The pause before redialling after `streak` brief connections in a row (connections that
    /// ended within 250 ms having carried nothing: a peer that accepts and drops). None for
    /// the first — one brief connection is a migration's cut as often as not — then `interval`,
    /// doubling per further one up to `maxInterval`. Without it such a peer is dialled again
    /// the moment it drops, without end: a dial that "succeeds" never counts against a cycle.
    public func pause(afterBriefConnections streak: Int) -> Duration? {
        guard streak >= 2 else { return nil }
        var delay = interval
        for _ in 2..<streak {
            delay = delay * 2
            if delay >= maxInterval { return maxInterval }
        }
        return min(delay, maxInterval)
    }

    /// The pause after the `attempt`-th failed dial (1-based).
    public func delay(afterAttempt attempt: Int) -> Duration {
        guard multiplier > 1.0, attempt > 1 else { return min(interval, maxInterval) }
        var delay = interval
        for _ in 1..<attempt {
            delay = delay * multiplier
            if delay >= maxInterval { return maxInterval }
        }
        return delay
    }
}
