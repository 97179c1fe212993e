/// Tells when one signal comes so often that the process should let the kernel discard it for
/// a while (SIG_IGN: an ignored signal is dropped when it is sent, at no cost to its target).
/// A root process sending the supervisor a stray signal in a loop took most of a CPU from it
/// (about 40 µs of the supervisor's for each signal, debug build), and the supervisor is what
/// forks and reaps every container.
public struct SignalBurstLimit: Sendable {
    /// At most this many of one signal within `window`; the one past it mutes the signal.
    public let limit: Int
    public let window: Duration
    /// How long a muted signal stays muted.
    public let muted: Duration
    private var counts: [Int32: (start: ContinuousClock.Instant, count: Int)] = [:]
    private var mutedUntil: [Int32: ContinuousClock.Instant] = [:]

    public init(limit: Int = 20, window: Duration = .seconds(1), muted: Duration = .seconds(10)) {
        self.limit = limit
        self.window = window
        self.muted = muted
    }

    public enum Verdict: Sendable, Equatable {
        /// Within the limit: handle it.
        case heard
        /// Past the limit: mute it now (for `muted`).
        case mute
        /// Muted already: one sent before the mute took effect, read afterwards; drop it.
        case muted
    }

    /// `signal` arrived at `now`. Its count starts again once a mute is over.
    public mutating func arrived(_ signal: Int32, at now: ContinuousClock.Instant = .now) -> Verdict {
        if let until = mutedUntil[signal] {
            if now < until { return .muted }
            mutedUntil[signal] = nil
        }
        var entry = counts[signal] ?? (now, 0)
        if now - entry.start >= window { entry = (now, 0) }
        entry.count += 1
        guard entry.count > limit else {
            counts[signal] = entry
            return .heard
        }
        counts[signal] = nil
        mutedUntil[signal] = now + muted
        return .mute
    }
}
