/// How many handoff-socket connections the broker holds, and what it does with the next one.
///
/// Any process that may `connect(2)` to the socket costs the broker an fd per connection, and
/// the broker's fds are what its streams redial with: a peer that opens connections without end
/// (admitted or not) must not be able to spend them. So the broker serves at most `maxServed`
/// admitted connections at once and answers at most `maxRefusing` refusals at once (each waits
/// up to 2 s for the peer's first request, so the peer reads why); a connection beyond either is
/// closed as soon as it is accepted. Refused and admitted connections have separate budgets, so
/// a flood from a uid that is not admitted never keeps an admitted runtime out.
///
/// Pure bookkeeping (no fds, no clock): the broker holds one in a lock.
public struct HandoffConnectionGate: Sendable, Equatable {
    /// What happens to an accepted connection.
    public enum Verdict: Sendable, Equatable {
        /// Served until the peer closes it (counts against `maxServed`).
        case serve
        /// Answered with an error to its first request, then closed (counts against `maxRefusing`).
        case refuse(Refusal)
        /// Closed at once: both budgets it could use are spent.
        case drop
    }

    /// Why a connection is refused.
    public enum Refusal: Sendable, Equatable {
        /// Its peer's uid and gid are in neither allow-list.
        case notAllowed
        /// `maxServed` admitted connections are open already.
        case full
        /// The broker's fds are down to what it keeps for its streams' redials.
        case noDescriptorRoom
    }

    public let maxServed: Int
    public let maxRefusing: Int
    public private(set) var served = 0
    public private(set) var refusing = 0
    /// Connections refused or dropped since the gate was made (for `stats`).
    public private(set) var turnedAway: UInt64 = 0

    public init(maxServed: Int, maxRefusing: Int = 8) {
        precondition(maxServed > 0 && maxRefusing > 0, "a handoff gate needs room for a connection of each kind")
        self.maxServed = maxServed
        self.maxRefusing = maxRefusing
    }

    /// Decides for a connection whose peer is (`allowed`) or is not admitted by the allow-lists.
    /// `hasRoom` (the broker's fd count against its limit, which costs a directory listing) is
    /// asked only for a connection that would otherwise be served.
    public mutating func admit(allowed: Bool, hasRoom: () -> Bool = { true }) -> Verdict {
        let refusal: Refusal
        if !allowed {
            refusal = .notAllowed
        } else if served >= maxServed {
            refusal = .full
        } else if !hasRoom() {
            refusal = .noDescriptorRoom
        } else {
            served += 1
            return .serve
        }
        turnedAway += 1
        guard refusing < maxRefusing else { return .drop }
        refusing += 1
        return .refuse(refusal)
    }

    /// The connection `verdict` was given has ended (a dropped one never held a place).
    public mutating func release(_ verdict: Verdict) {
        switch verdict {
        case .serve:
            precondition(served > 0, "a served handoff connection released twice")
            served -= 1
        case .refuse:
            precondition(refusing > 0, "a refused handoff connection released twice")
            refusing -= 1
        case .drop:
            break
        }
    }
}

/// Bounds the log lines a flood of turned-away connections costs: at most `linesPerWindow` get a
/// line of their own in each window; the rest are counted and said in one line when the window
/// ends. Pure: the caller passes the time and schedules the window's end.
public struct TurnAwayLog: Sendable, Equatable {
    /// What to do with one turned-away connection.
    public enum Decision: Sendable, Equatable {
        /// Log it on a line of its own; `windowStarted`: schedule `closeWindow` a window from now.
        case logLine(windowStarted: Bool)
        /// Counted for the window's summary (its end is already scheduled).
        case counted
    }

    public let linesPerWindow: Int
    private var windowOpen = false
    private var lines = 0
    public private(set) var unreportedRefusals: UInt64 = 0
    public private(set) var unreportedDrops: UInt64 = 0

    public init(linesPerWindow: Int = 8) {
        self.linesPerWindow = linesPerWindow
    }

    /// One connection turned away: refused with an answer (`dropped` false) or closed at once.
    public mutating func note(dropped: Bool) -> Decision {
        let started = !windowOpen
        windowOpen = true
        if lines < linesPerWindow {
            lines += 1
            return .logLine(windowStarted: started)
        }
        if dropped { unreportedDrops += 1 } else { unreportedRefusals += 1 }
        return .counted
    }

    /// The window ended: what was only counted in it (say it when either is above zero); the next
    /// connection turned away starts a new window.
    public mutating func closeWindow() -> (refusals: UInt64, drops: UInt64) {
        defer {
            windowOpen = false
            lines = 0
            unreportedRefusals = 0
            unreportedDrops = 0
        }
        return (unreportedRefusals, unreportedDrops)
    }
}
