import CHoldfastShims

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

        /// What a role's log says of it (a warning if `tookOver`, else an error).
        public var message: String {
            tookOver
                ? "I/O thread stuck in the kernel (a process holds its pipe's lock); a new thread serves the other streams"
                : "I/O thread stuck in the kernel, and the limit of stuck threads is reached: every stream waits for it"
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

    /// Calls `handler` (from a task of its own) at every takeover.
    public func onStall(_ handler: @escaping @Sendable (Stall) -> Void) {
        stallHandler.withLockedValue { $0 = handler }
    }

    /// The watchdog: samples the loop every `stallLimit`; the same job running at two samples in
    /// a row has run for at least that long. A job of the data plane is one bounded pass of
    /// non-blocking syscalls, so only the kernel holding one of them can make it that long — or
    /// the whole process not running: a tick that comes late (the broker stopped, the VM paused)
    /// judges nothing, as every thread stood still alike.
    func watch() {
        var judge = StallJudge(maxStrandedThreads: maxStrandedThreads)
        var lastTick = ContinuousClock.now
        while true {
            Self.sleep(stallLimit)
            let now = ContinuousClock.now
            let late = now - lastTick > stallLimit * 1.5
            lastTick = now
            let stall: (Stall, runner: UInt64?, stuckTID: pid_t)? = queue.withLockedValue { q in
                let sample = q.inJob ? StallJudge.Job(runner: q.runner, started: q.started) : nil
                let verdict = judge.tick(running: sample, late: late, stranded: q.stranded)
                let stuckTID = q.runnerTID
                let fds = [outerSyscallFD.load(ordering: .relaxed), innerSyscallFD.load(ordering: .relaxed)].filter { $0 >= 0 }
                switch verdict {
                case .nothing:
                    return nil
                case .reportLimit:
                    return (Stall(fds: fds, strandedThreads: q.stranded, tookOver: false), nil, stuckTID)
                case .takeOver:
                    break
                }
                // The jobs behind the stuck one go first, before anything queued since.
                q.jobs.insert(contentsOf: q.batch[q.next...], at: 0)
                q.batch = []
                q.next = 0
                q.inJob = false
                q.runner &+= 1
                q.runnerTID = 0
                q.stranded += 1
                q.stalls += 1
                // The stuck thread is no longer the loop's: its syscall's end must not clear
                // what the new one notes.
                thread.store(0, ordering: .relaxed)
                outerSyscallFD.store(-1, ordering: .relaxed)
                innerSyscallFD.store(-1, ordering: .relaxed)
                return (Stall(fds: fds, strandedThreads: q.stranded, tookOver: true), q.runner, stuckTID)
            }
            guard let stall else { continue }
            var report = stall.0
            report.kernelFunction = Self.kernelFunction(of: stall.stuckTID)
            if let runner = stall.runner { startRunner(runner) }
            // Reported from a task: a handler that logs may block (a full log pipe), and this
            // thread must go on watching.
            if let handler = stallHandler.withLockedValue({ $0 }) { Task.detached { handler(report) } }
        }
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

    /// Notes that the loop's thread is about to make a syscall on `fd` (for a takeover's report);
    /// nothing on any other thread. Returns what `endSyscall` needs.
    @inline(__always)
    func beginSyscall(on fd: Int32) -> Int {
        guard isCurrent else { return 0 }
        if outerSyscallFD.load(ordering: .relaxed) < 0 {
            outerSyscallFD.store(fd, ordering: .relaxed)
            return 1
        }
        innerSyscallFD.store(fd, ordering: .relaxed)
        return 2
    }

    @inline(__always)
    func endSyscall(_ noted: Int) {
        guard noted != 0, isCurrent else { return }
        if noted == 1 { outerSyscallFD.store(-1, ordering: .relaxed) } else { innerSyscallFD.store(-1, ordering: .relaxed) }
    }

    /// Starts the thread that runs the loop as `runner`, retrying while the system has no thread
    /// to give: without it nothing in the process moves.
    private func startRunner(_ runner: UInt64) {
        while true {
            do {
                try Self.startThread("reactor") { [self] in runLoop(as: runner) }
                return
            } catch {
                Self.sleep(.milliseconds(10))
            }
        }
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

