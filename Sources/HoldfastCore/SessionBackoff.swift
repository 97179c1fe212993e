/// The bridge worker's pause before each dial: after a dial or a handshake that failed, a pause
/// that doubles up to `max`; after a session that was in use, `initial` again. A session that
/// ended at once — the host refused what it was sent (a hello it cannot read, from a guest
/// newer than it) or closes every connection — counts as a failure: redialled every `initial`
/// instead, such a host had the guest reconnect ten times a second, and each time every parked
/// stream redialled and every stream's connection was cut (`disconnect-all`).
public struct SessionBackoff: Sendable, Equatable {
    /// A session shorter than this ended at once.
    public static let briefSession: Duration = .seconds(2)

    public let initial: Duration
    public let max: Duration
    /// The pause a failure now waits.
    public private(set) var next: Duration
    /// Sessions in a row that ended at once.
    public private(set) var briefSessions = 0

    public init(initial: Duration, max: Duration) {
        self.initial = initial
        self.max = Swift.max(initial, max)
        next = initial
    }

    /// A dial or a handshake failed: the pause before the next, doubled for the one after.
    public mutating func failed() -> Duration {
        let pause = next
        next = Swift.min(next * 2, max)
        return pause
    }

    /// A connection was made and its handshake passed: the pause the dials before it grew (a
    /// blackout's) is over — unless the sessions before it ended at once, whose pause goes on
    /// growing until one is in use.
    public mutating func connected() {
        if briefSessions == 0 { next = initial }
    }

    /// A session ended after `lasted`: a brief one is a failure; one that was in use starts over.
    public mutating func ended(after lasted: Duration) -> Duration {
        guard lasted >= Self.briefSession else {
            briefSessions += 1
            return failed()
        }
        briefSessions = 0
        next = initial
        return initial
    }
}
