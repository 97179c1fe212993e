/// When the supervisor lets go of a process that made it its tracer, at each of that process's
/// stops (the let-go itself: `UnwantedTracee` in HoldfastPosix).
///
/// Why a pace: every stop of such a process is a `waitpid` report and a `PTRACE_DETACH` on the
/// supervisor's one spawn thread, about 46 µs of its CPU, and the process waits in the stop for
/// it. Let go at once, a process that calls `PTRACE_TRACEME` and signals itself in a loop runs
/// as fast as the supervisor answers and takes about one of its threads (measured: 0.6 CPU on a
/// 2-core guest), from every container. A program making the debugger check does it a few times
/// in its life; so each process's first `freeStops` stops are let go at once, and after that its
/// stops are let go no closer together than `perProcessInterval`, and all such held stops no
/// closer together than `overallInterval` (orphans are cheap to make: each gets its free stops,
/// and the overall spacing bounds what many of them cost). The offender is slowed, nobody else.
///
/// Pure: the caller gives the time, and keeps the held stops (at most one per process: a process
/// stays in its stop until let go).
public struct TraceeLetGoPace: Sendable {
    public struct Limits: Sendable, Equatable {
        /// Stops of one process let go at once, in its life.
        public var freeStops: Int
        /// Least time between two let-gos of one process, after its free stops.
        public var perProcessInterval: Duration
        /// Least time between two held let-gos of any processes.
        public var overallInterval: Duration
        /// Free stops of every process together, per second (and at most this many at once);
        /// past it a free stop is held like any other. Orphans are cheap to make and each had
        /// its free stops: a loop of short-lived processes that stopped their 16 times each was
        /// let go at once every time, unbounded.
        public var freeStopsPerSecond: Int

        public init(freeStops: Int, perProcessInterval: Duration, overallInterval: Duration, freeStopsPerSecond: Int = 256) {
            self.freeStops = freeStops
            self.perProcessInterval = perProcessInterval
            self.overallInterval = overallInterval
            self.freeStopsPerSecond = freeStopsPerSecond
        }

        /// 16 stops free (256 a second in all), then at most 100 per second per process and 200
        /// per second in all. A held stop costs the supervisor about 0.25 ms of CPU (its report,
        /// the reaper's wake, the timer, the trip to the spawn thread: `bench/tracee-loop.sh`), a
        /// free one about 46 µs, so this bounds what any number of looping processes — or of
        /// processes made to stop a few times each — take to about 6 % of a CPU (2 ms apart
        /// measured 10 %).
        public static let standard = Limits(freeStops: 16, perProcessInterval: .milliseconds(10), overallInterval: .milliseconds(5))
    }

    private struct Record {
        var stops = 0
        var lastLetGo: ContinuousClock.Instant?
    }

    public let limits: Limits
    private var records: [Int32: Record] = [:]
    private var lastHeldLetGo: ContinuousClock.Instant?
    /// Free stops left to every process together, and when it was last topped up.
    private var freeBudget: Double
    private var freeBudgetAt: ContinuousClock.Instant?

    public init(limits: Limits = .standard) {
        self.limits = limits
        freeBudget = Double(limits.freeStopsPerSecond)
    }

    /// Takes one free stop from the budget every process shares, if one is left at `now`.
    private mutating func takeFreeStop(at now: ContinuousClock.Instant) -> Bool {
        let capacity = Double(limits.freeStopsPerSecond)
        if let last = freeBudgetAt, now > last {
            let elapsed = now - last
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            freeBudget = min(capacity, freeBudget + seconds * capacity)
        }
        if freeBudgetAt.map({ now > $0 }) ?? true { freeBudgetAt = now }
        guard freeBudget >= 1 else { return false }
        freeBudget -= 1
        return true
    }

    /// `pid` stopped at `now`: nil to let it go now, or the instant to let it go at.
    public mutating func stopped(_ pid: Int32, at now: ContinuousClock.Instant) -> ContinuousClock.Instant? {
        var record = records[pid, default: Record()]
        record.stops += 1
        defer { records[pid] = record }
        if record.stops <= limits.freeStops, takeFreeStop(at: now) {
            record.lastLetGo = now
            return nil
        }
        var due = now
        if let last = record.lastLetGo { due = max(due, last + limits.perProcessInterval) }
        if let last = lastHeldLetGo { due = max(due, last + limits.overallInterval) }
        record.lastLetGo = due
        lastHeldLetGo = due
        return due > now ? due : nil
    }

    /// `pid` exited (and was reaped): the next process with that pid starts afresh.
    public mutating func exited(_ pid: Int32) {
        records.removeValue(forKey: pid)
    }

    /// Processes with a record (for tests: records do not outlive their process).
    public var recordCount: Int { records.count }
}
