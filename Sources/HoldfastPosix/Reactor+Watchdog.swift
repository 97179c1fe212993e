import CHoldfastShims
import NIOConcurrencyHelpers
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

// MARK: - Taking over from a thread stuck in the kernel

extension Reactor {
    /// A takeover: the loop's thread was found inside one job for longer than `stallLimit`.
    public struct Stall: Sendable, Equatable {
        /// The fds of the syscall the stuck thread sat in (a splice has two), as the data plane
        /// noted them before making it; empty if it was in no syscall of an `AsyncFD`.
        public var fds: [Int32]
        /// Where in the kernel it waits (/proc's wchan, e.g. "pipe_write"); nil if not asleep.
        public var kernelFunction: String?
        /// Threads left stuck now, this one included.
        public var strandedThreads: Int
        /// False when `maxStrandedThreads` were already stuck: no new thread took over, and the
        /// loop waits for a stuck thread to come back.
        public var tookOver: Bool
        /// True when no thread could be made to take over (the guest's tasks exhausted): the
        /// takeover is put off to the next judgment.
        public var noThread = false

        /// What a role's log says of it (a warning if `tookOver`, else an error).
        public var message: String {
            if tookOver { return "I/O thread stuck in the kernel (a process holds its pipe's lock); a new thread serves the other streams" }
            if noThread {
                return "I/O thread stuck in the kernel, and no thread could be made to take over (the guest has no task to give: a pids limit, "
                    + "threads-max): every stream waits for it until one can"
            }
            return "I/O thread stuck in the kernel, and the limit of stuck threads is reached: every stream waits for it"
        }

        /// The log line's fields.
        public var fields: [(String, String)] {
            [("kernelWait", kernelFunction ?? "unknown"), ("fds", "\(fds)"), ("strandedThreads", "\(strandedThreads)")]
        }
    }

    /// Takeovers so far.
    public var stalls: Int { queue.withLockedValue { $0.stalls } }

    /// Threads taken over whose stuck job has not returned yet.
    public var strandedThreads: Int { queue.withLockedValue { $0.stranded } }

    /// Whether a thread waits for the next takeover (made ahead: `makeSpare`).
    public var hasSpareThread: Bool { spare.withLockedValue { $0 != nil } }
    /// Takeovers put off because no thread could be made.
    public var takeoversPutOff: Int { takeoversWithoutThread.load(ordering: .relaxed) }

    /// Calls `handler` (from a task of its own) at every takeover.
    public func onStall(_ handler: @escaping @Sendable (Stall) -> Void) {
        stallHandler.withLockedValue { $0 = handler }
    }

    /// The watchdog. Two judgments:
    /// - a job of the loop running at two samples `stallLimit` apart is stuck. A job of the data
    ///   plane is one bounded pass of non-blocking syscalls, so only the kernel holding one of
    ///   them can make it that long;
    /// - one syscall of the loop's found asleep in the kernel at two samples in a row (while the
    ///   loop is busy, they are `syscallLimit` apart) waits for a lock. A non-blocking syscall
    ///   does not sleep but for a lock (or memory being reclaimed): a process that holds its
    ///   pipe's lock for just under the first judgment's second, over and over, would otherwise
    ///   stop every other stream nearly all the time, and never be judged.
    /// Samples come every `syscallLimit` while the loop was seen busy in the last few seconds,
    /// else every `stallLimit` (at most a second): an idle broker wakes once a second. A tick
    /// that comes late (the broker stopped, the VM paused) judges nothing, as every thread stood
    /// still alike.
    func watch() {
        makeSpare()
        var jobs = StallJudge(maxStrandedThreads: maxStrandedThreads)
        var syscalls = SyscallJudge()
        var pace = WatchPace(slow: min(stallLimit, .seconds(1)), fast: syscallLimit)
        var lastTick = ContinuousClock.now
        var lastJobSample = lastTick
        while true {
            let interval = pace.interval(at: lastTick)
            Self.sleep(interval)
            let now = ContinuousClock.now
            let late = now - lastTick > interval * 1.5 + .milliseconds(50)
            lastTick = now
            // The job judgment's own lateness is its samples' gap: a fast tick that came late
            // (steal time) must not void it for the whole second.
            let judgeJobs = now - lastJobSample >= stallLimit
            let jobsLate = now - lastJobSample > stallLimit * 1.5 + syscallLimit
            if judgeJobs { lastJobSample = now }
            let (stall, busy, sample): ((Stall, runner: (UInt64, SpareThread)?, stuckTID: pid_t)?, Bool, (SyscallJudge.Sample, pid_t)?) =
                queue.withLockedValue { q in
                    let inSyscall = syscallInProgress.load(ordering: .acquiring)
                    let sample = q.inJob && inSyscall != 0 ? (SyscallJudge.Sample(runner: q.runner, syscall: inSyscall), q.runnerTID) : nil
                    guard judgeJobs else { return (nil, q.inJob, sample) }
                    let job = q.inJob ? StallJudge.Job(runner: q.runner, started: q.started) : nil
                    let stuckTID = q.runnerTID
                    switch jobs.tick(running: job, late: jobsLate, stranded: q.stranded) {
                    case .nothing:
                        return (nil, q.inJob, sample)
                    case .reportLimit:
                        return ((Stall(fds: syscallFDs(), strandedThreads: q.stranded, tookOver: false), nil, stuckTID), true, nil)
                    case .takeOver:
                        // No thread to hand the loop to: the stuck one keeps it (it may yet
                        // come back), judged again at the next ticks.
                        guard let next = takeSpare() else {
                            var report = Stall(fds: syscallFDs(), strandedThreads: q.stranded, tookOver: false)
                            report.noThread = true
                            return ((report, nil, stuckTID), true, nil)
                        }
                        let fds = syscallFDs()
                        let runner = takeOver(&q)
                        return ((Stall(fds: fds, strandedThreads: q.stranded, tookOver: true), (runner, next), stuckTID), true, nil)
                    }
                }
            if busy { pace.sawBusy(at: now) }
            var taken = stall
            if taken != nil {
                syscalls.reset()
            } else {
                // Its state read outside the queue's lock (the loop takes it for every job); only
                // while a syscall is in progress.
                let asleep = sample.map { Self.isAsleep($0.1) } ?? false
                let stranded = strandedThreads
                if let suspect = syscalls.tick(inSyscall: sample?.0, asleep: asleep, late: late, stranded: stranded, maxStranded: maxStrandedThreads),
                    let tid = sample?.1
                {
                    // Asleep in the same syscall at both samples: taken over unless it came back
                    // (or the loop moved on) since.
                    taken = queue.withLockedValue { q in
                        guard q.runner == suspect.runner, q.inJob, syscallInProgress.load(ordering: .acquiring) == suspect.syscall,
                            q.stranded < maxStrandedThreads
                        else { return nil }
                        guard let next = takeSpare() else {
                            var report = Stall(fds: syscallFDs(), strandedThreads: q.stranded, tookOver: false)
                            report.noThread = true
                            return (report, nil, tid)
                        }
                        let fds = syscallFDs()
                        let runner = takeOver(&q)
                        return (Stall(fds: fds, strandedThreads: q.stranded, tookOver: true), (runner, next), tid)
                    }
                    if taken != nil { syscalls.reset() }
                }
            }
            guard let taken else { continue }
            var report = taken.0
            report.kernelFunction = Self.kernelFunction(of: taken.stuckTID)
            if let (runner, next) = taken.runner {
                next.run(as: runner)
                makeSpare()
            }
            // Reported from a task: a handler that logs may block (a full log pipe), and this
            // thread must go on watching.
            if let handler = stallHandler.withLockedValue({ $0 }) { Task.detached { handler(report) } }
        }
    }

    /// The fds of the loop's syscall in progress, as the data plane noted them.
    private func syscallFDs() -> [Int32] {
        [outerSyscallFD.load(ordering: .relaxed), innerSyscallFD.load(ordering: .relaxed)].filter { $0 >= 0 }
    }

    /// Hands the loop to a new thread, under the queue's lock: the jobs behind the stuck one go
    /// first, before anything queued since. Returns the new thread's runner number.
    private func takeOver(_ q: inout JobQueue) -> UInt64 {
        q.jobs.insert(contentsOf: q.batch[q.next...], at: 0)
        q.batch = []
        q.next = 0
        q.inJob = false
        q.runner &+= 1
        q.runnerTID = 0
        q.stranded += 1
        q.stalls += 1
        // The stuck thread is no longer the loop's: its syscall's end must not clear what the
        // new one notes.
        thread.store(0, ordering: .relaxed)
        outerSyscallFD.store(-1, ordering: .relaxed)
        innerSyscallFD.store(-1, ordering: .relaxed)
        syscallInProgress.store(0, ordering: .relaxed)
        return q.runner
    }

    /// Whether thread `tid` of this process sleeps (in the kernel: `S` or `D` in /proc), rather
    /// than runs or waits for a CPU (`R`: a long copy on a busy machine is not a lock's wait).
    static func isAsleep(_ tid: pid_t) -> Bool {
        guard tid > 0, let line = ProcessRunState.firstLine(of: "/proc/self/task/\(tid)/stat"),
            let state = ProcessRunState.state(ofStatLine: line)
        else { return false }
        return state == "S" || state == "D"
    }

    /// How often the watchdog samples: `fast` while the loop was seen in a job within the last
    /// `busyLinger`, else `slow` — so an idle broker wakes once a second, and a process holding
    /// its pipe's lock again and again keeps the sampling fast (the loop is in a job each time).
    struct WatchPace: Sendable {
        let slow: Duration
        let fast: Duration
        static let busyLinger: Duration = .seconds(5)
        private var fastUntil: ContinuousClock.Instant?

        init(slow: Duration, fast: Duration) {
            self.slow = slow
            self.fast = min(fast, slow)
        }

        func interval(at now: ContinuousClock.Instant) -> Duration {
            guard let fastUntil, now < fastUntil else { return slow }
            return fast
        }

        mutating func sawBusy(at now: ContinuousClock.Instant) {
            fastUntil = now + Self.busyLinger
        }
    }

    /// The second judgment, apart from the clock and the threads: the loop's syscall in
    /// progress at this sample against the one at the sample before.
    struct SyscallJudge: Sendable {
        /// One syscall of the loop's: the thread running the loop and the syscall's number.
        struct Sample: Sendable, Equatable {
            var runner: UInt64
            var syscall: UInt64
        }

        private var last: (sample: Sample, asleep: Bool)?

        /// `inSyscall`: the loop's syscall at this tick, if any, and whether its thread sleeps in
        /// the kernel now; `late`: the tick came well after its time (nothing is judged, and the
        /// next tick starts over). Returns the syscall if it is the one in progress at the tick
        /// before and its thread slept at both: a lock's wait (or reclaim) of at least the
        /// samples' interval, not a call that happened to be asleep at one instant.
        mutating func tick(inSyscall: Sample?, asleep: Bool, late: Bool, stranded: Int, maxStranded: Int) -> Sample? {
            let previous = last
            last = late ? nil : inSyscall.map { ($0, asleep) }
            guard !late, let inSyscall, let previous, previous.sample == inSyscall, previous.asleep, asleep, stranded < maxStranded else {
                return nil
            }
            return inSyscall
        }

        /// After a takeover: the next thread's syscalls are new ones.
        mutating func reset() { last = nil }
    }

    /// The watchdog's judgment at each tick, apart from the clock and the threads: what the loop
    /// runs now against what it ran at the tick before.
    struct StallJudge: Sendable {
        /// A job of the loop: the thread running it and when it started (one job per pair).
        struct Job: Sendable, Equatable {
            var runner: UInt64
            var started: UInt64
        }

        enum Verdict: Sendable, Equatable {
            /// Nothing stuck (or nothing that may be judged at this tick).
            case nothing
            /// The job ran from the tick before to this one: a new thread takes over.
            case takeOver
            /// The same, with `maxStrandedThreads` already stuck: said once per stuck job.
            case reportLimit
        }

        let maxStrandedThreads: Int
        private var last: Job?
        /// The stuck job the limit was reported for: once per job, whatever the ticks (a late
        /// tick judges nothing, and must not make the same job be reported again).
        private var limitReportedFor: Job?

        init(maxStrandedThreads: Int) {
            self.maxStrandedThreads = maxStrandedThreads
        }

        /// `running`: the job in progress at this tick, if any; `late`: this tick came well after
        /// its time (every thread stood still alike, so nothing is judged and the next tick
        /// starts over); `stranded`: threads stuck so far.
        mutating func tick(running: Job?, late: Bool, stranded: Int) -> Verdict {
            let previous = last
            last = late ? nil : running
            // Late: not even against the tick before. (It was judged against it, so a job in
            // progress when the broker was stopped, or the VM paused, was taken over when it went
            // on — a thread stranded and a warning for a job that was never stuck.)
            guard !late, let running, let previous, previous == running else { return .nothing }
            guard stranded < maxStrandedThreads else {
                if limitReportedFor == running { return .nothing }
                limitReportedFor = running
                return .reportLimit
            }
            // The next thread's jobs are new ones: nothing carries over.
            last = nil
            return .takeOver
        }
    }

    /// Closes `fd` on the loop's thread (at once if called there). The last close of a pipe's
    /// end takes the pipe's lock to let the pipe go, and a guest process may hold that lock:
    /// there the watchdog takes over from a stuck close as from any stuck syscall; on a thread of
    /// the global pool it would hold that thread, and the supervisor's or broker's tasks with it.
    public func closeOnLoop(_ fd: Int32) {
        guard !isCurrent else {
            let noted = beginSyscall(on: fd)
            _ = Glibc.close(fd)
            endSyscall(noted)
            return
        }
        Task(executorPreference: self) { [self] in closeOnLoop(fd) }
    }

    // MARK: Syscalls in progress

    /// Notes that the loop's thread is about to make a syscall on `fd` (for a takeover's report,
    /// and, the outer one, numbered for the watchdog's second judgment); nothing on any other
    /// thread. Returns what `endSyscall` needs: 0 nothing noted, 1 an inner one, else the number.
    @inline(__always)
    func beginSyscall(on fd: Int32) -> UInt64 {
        guard isCurrent else { return 0 }
        if outerSyscallFD.load(ordering: .relaxed) < 0 {
            outerSyscallFD.store(fd, ordering: .relaxed)
            // Only the loop's thread writes the count (a taken-over one is no longer current).
            let number = syscallsBegun.load(ordering: .relaxed) &+ 1
            syscallsBegun.store(number, ordering: .relaxed)
            syscallInProgress.store(number, ordering: .releasing)
            return number
        }
        innerSyscallFD.store(fd, ordering: .relaxed)
        return 1
    }

    @inline(__always)
    func endSyscall(_ noted: UInt64) {
        guard noted != 0, isCurrent else { return }
        if noted == 1 {
            innerSyscallFD.store(-1, ordering: .relaxed)
        } else {
            outerSyscallFD.store(-1, ordering: .relaxed)
            syscallInProgress.store(0, ordering: .relaxed)
        }
    }

    /// Makes the thread the next takeover hands the loop to, unless one waits already. Made ahead:
    /// made at the takeover, a system out of tasks (a container forking up to `threads-max`)
    /// left the loop with no thread at all — the stuck one, superseded, went away when its
    /// syscall returned — and every stream of the process stopped until a task came free. A
    /// takeover with no spare is put off instead (`takeSpare`); the next tick tries again.
    func makeSpare() {
        guard spare.withLockedValue({ $0 == nil }) else { return }
        let thread = SpareThread()
        do {
            try Self.startThread("reactor") { [self] in
                guard let runner = thread.waitForTurn() else { return }
                runLoop(as: runner)
            }
            spare.withLockedValue { $0 = thread }
        } catch {
            // None to be had now: the next takeover is put off until one is (`takeSpare`).
        }
    }

    /// The spare thread, taken for a takeover (nil: none could be made; counted).
    private func takeSpare() -> SpareThread? {
        if let thread = spare.withLockedValue({ s in defer { s = nil }; return s }) { return thread }
        makeSpare()
        if let thread = spare.withLockedValue({ s in defer { s = nil }; return s }) { return thread }
        takeoversWithoutThread.add(1, ordering: .relaxed)
        return nil
    }

    static func sleep(_ duration: Duration) {
        let (seconds, attoseconds) = duration.components
        var request = timespec(tv_sec: Int(seconds), tv_nsec: Int(attoseconds / 1_000_000_000))
        var remaining = timespec()
        while nanosleep(&request, &remaining) != 0, errno == EINTR { request = remaining }
    }

    /// Where a thread sleeps in the kernel: /proc's wchan, readable by a process about its own
    /// threads even when it is not dumpable (unlike `syscall`, whose file is then root's).
    static func kernelFunction(of tid: pid_t) -> String? {
        guard tid > 0, let name = ProcessRunState.firstLine(of: "/proc/self/task/\(tid)/wchan") else { return nil }
        return name.isEmpty || name == "0" ? nil : name
    }
}


/// A thread started ahead of need, blocked until it is given the loop to run (`run(as:)`).
final class SpareThread: Sendable {
    private let turn = ConditionLock<Int>(value: 0)
    private let runner = Atomic<UInt64>(0)

    /// On the spare thread: blocks until `run(as:)`, then returns the runner number.
    func waitForTurn() -> UInt64? {
        turn.lock(whenValue: 1)
        turn.unlock()
        return runner.load(ordering: .acquiring)
    }

    /// Hands the loop to the spare thread as `runner`.
    func run(as number: UInt64) {
        runner.store(number, ordering: .releasing)
        turn.lock()
        turn.unlock(withValue: 1)
    }
}
