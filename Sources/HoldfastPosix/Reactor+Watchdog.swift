import CHoldfastShims

#if canImport(Glibc)
import Glibc
#endif

// MARK: - Taking over from a thread stuck in the kernel

extension Reactor {
    /// A takeover: the loop's thread was found inside one job for longer than `stallLimit`.
    public struct Stall: Sendable, Equatable {
        /// The syscall the stuck thread sat in when it was found, as the kernel reports it
        /// (e.g. "read(fd 17)"); nil if it was not in one or the kernel would not say.
        public var syscall: String?
        /// The fd that syscall was given, when it takes one first.
        public var fd: Int32?
        /// Threads left stuck now, this one included.
        public var strandedThreads: Int
        /// False when `maxStrandedThreads` were already stuck: no new thread took over, and the
        /// loop waits for a stuck thread to come back.
        public var tookOver: Bool
    }

    /// Takeovers so far.
    public var stalls: Int { queue.withLockedValue { $0.stalls } }

    /// Threads taken over whose stuck job has not returned yet.
    public var strandedThreads: Int { queue.withLockedValue { $0.stranded } }

    /// Calls `handler` (on the watchdog's thread; it must not block) at every takeover.
    public func onStall(_ handler: @escaping @Sendable (Stall) -> Void) {
        stallHandler.withLockedValue { $0 = handler }
    }

    /// The watchdog: samples the loop every `stallLimit`; the same job running at two samples in
    /// a row has run for at least that long. A job of the data plane is one bounded pass of
    /// non-blocking syscalls, so only the kernel holding one of them can make it that long — or
    /// the whole process not running: a tick that comes late (the broker stopped, the VM paused)
    /// judges nothing, as every thread stood still alike.
    func watch() {
        var last: (runner: UInt64, started: UInt64)?
        var lastTick = ContinuousClock.now
        var reportedLimit = false
        while true {
            Self.sleep(stallLimit)
            let now = ContinuousClock.now
            let late = now - lastTick > stallLimit * 1.5
            lastTick = now
            let stall: (Stall, runner: UInt64?, stuckTID: pid_t)? = queue.withLockedValue { q in
                let sample = q.inJob ? (runner: q.runner, started: q.started) : nil
                let previous = last
                last = late ? nil : sample
                guard let sample, let previous, previous == sample else {
                    reportedLimit = false
                    return nil
                }
                let stuckTID = q.runnerTID
                guard q.stranded < maxStrandedThreads else {
                    if reportedLimit { return nil }
                    reportedLimit = true
                    return (Stall(strandedThreads: q.stranded, tookOver: false), nil, stuckTID)
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
                last = nil
                return (Stall(strandedThreads: q.stranded, tookOver: true), q.runner, stuckTID)
            }
            guard let stall else { continue }
            var report = stall.0
            (report.syscall, report.fd) = Self.syscall(of: stall.stuckTID)
            if let runner = stall.runner { startRunner(runner) }
            let handler = stallHandler.withLockedValue { $0 }
            handler?(report)
        }
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

    /// What `/proc/self/task/TID/syscall` says of a thread: the syscall's name (for the ones
    /// the data plane makes) and its first argument, an fd for all of those.
    static func syscall(of tid: pid_t) -> (String?, Int32?) {
        guard tid > 0 else { return (nil, nil) }
        let fd = open("/proc/self/task/\(tid)/syscall", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return (nil, nil) }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 256)
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return (nil, nil) }
        return describeSyscall(String(decoding: buffer[..<count], as: UTF8.self))
    }

    /// Parses the kernel's "NR ARG1 ARG2 …" line ("running" or "-1 …" when not in a syscall).
    static func describeSyscall(_ line: String) -> (String?, Int32?) {
        let fields = line.split(whereSeparator: { $0 == " " || $0 == "\n" })
        guard fields.count >= 2, let number = Int(fields[0]), number >= 0 else { return (nil, nil) }
        let argument = fields[1].hasPrefix("0x") ? Int64(fields[1].dropFirst(2), radix: 16) : nil
        let fd = argument.flatMap { Int32(exactly: $0) }
        guard let name = dataPlaneSyscalls[number] else { return ("syscall \(number)", nil) }
        return (fd.map { "\(name)(fd \($0))" } ?? name, fd)
    }

    /// The syscalls the data plane makes on an fd, by number for this architecture.
    private static let dataPlaneSyscalls: [Int: String] = {
        #if arch(x86_64)
        return [0: "read", 1: "write", 19: "readv", 20: "writev", 44: "sendto", 45: "recvfrom", 46: "sendmsg",
                47: "recvmsg", 275: "splice", 3: "close", 16: "ioctl"]
        #elseif arch(arm64)
        return [63: "read", 64: "write", 65: "readv", 66: "writev", 206: "sendto", 207: "recvfrom", 211: "sendmsg",
                212: "recvmsg", 76: "splice", 57: "close", 29: "ioctl"]
        #else
        return [:]
        #endif
    }()
}
