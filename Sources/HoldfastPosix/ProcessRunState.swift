#if canImport(Glibc)
import Glibc
#endif

/// What the kernel says a process is doing, for a status that must explain why it does not
/// answer: stopped (SIGSTOP, a debugger), or dying with a thread still inside the kernel — a
/// killed process whose thread waits for a lock no signal can interrupt (a pipe's lock that a
/// guest process holds: README, "Security") cannot finish dying until the lock is let go.
public enum ProcessRunState: Sendable, Equatable {
    case running
    case stopped
    /// Attached by a tracer (a debugger, strace): it runs, stops, or even finishes dying only as
    /// that process lets it (a traced process's death is the tracer's to collect first).
    case traced(by: pid_t)
    /// Its main thread has exited, yet a thread is still in the kernel, waiting in `waitingIn`
    /// (/proc's wchan) if the kernel says.
    case dying(waitingIn: String?)
    /// No such process (reaped, or never was).
    case gone

    public static func of(_ pid: pid_t) -> ProcessRunState {
        // The state and the tracer are two reads: a tracer that lets the process go between
        // them (the supervisor letting a self-traced process go with the SIGSTOP it stopped
        // on) made a tracing stop read as `stopped` a moment before the process took that
        // SIGSTOP — and a SIGCONT sent on that word came first and was lost: the process
        // stopped for good (a test waited for its exit for ever). The tracer is read before and
        // after; a change means a let-go under way, read again.
        var attempts = 0
        while true {
            attempts += 1
            let before = tracerPID(of: pid)
            guard let leader = state(of: "/proc/\(pid)/stat") else { return .gone }
            let after = tracerPID(of: pid)
            if before != after, attempts < 10 { continue }
            return judged(pid, leader: leader, tracer: after ?? 0)
        }
    }

    /// What a process is, from its main thread's state letter and its tracer (0: none).
    static func judged(leader: Character, tracer: pid_t, dying: () -> ProcessRunState) -> ProcessRunState {
        if tracer > 0 { return .traced(by: tracer) }
        switch leader {
        // A stop someone must continue.
        case "T": return .stopped
        // A tracing stop with no tracer: it is being let go — it runs, or stops on the signal
        // it was let go with, which the next look sees as `T`.
        case "t": return .running
        case "Z", "X": return dying()
        default: return .running
        }
    }

    private static func judged(_ pid: pid_t, leader: Character, tracer: pid_t) -> ProcessRunState {
        judged(leader: leader, tracer: tracer) { dyingState(pid) }
    }

    /// The main thread is a zombie: any task left is what keeps the process from dying.
    private static func dyingState(_ pid: pid_t) -> ProcessRunState {
        var waiting: String?
        if let directory = opendir("/proc/\(pid)/task") {
            defer { closedir(directory) }
            while let entry = readdir(directory) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                guard let tid = Int32(name), tid != pid, let task = state(of: "/proc/\(pid)/task/\(tid)/stat"), task != "Z" else { continue }
                waiting = firstLine(of: "/proc/\(pid)/task/\(tid)/wchan").flatMap { $0.isEmpty || $0 == "0" ? nil : $0 }
                if waiting != nil { break }
            }
        }
        return .dying(waitingIn: waiting)
    }

    /// The one-letter state of a /proc `stat` line: the field after the command's last ')'.
    static func state(ofStatLine line: String) -> Character? {
        guard let close = line.lastIndex(of: ")") else { return nil }
        return line[line.index(after: close)...].first { $0 != " " }
    }

    private static func state(of path: String) -> Character? {
        firstLine(of: path).flatMap(state(ofStatLine:))
    }

    /// The `TracerPid:` of a /proc `status` text (0: not traced), nil if it has none.
    static func tracerPID(inStatus text: String) -> pid_t? {
        for line in text.split(separator: "\n") where line.hasPrefix("TracerPid:") {
            return pid_t(String(line.dropFirst("TracerPid:".count).filter { !$0.isWhitespace }))
        }
        return nil
    }

    private static func tracerPID(of pid: pid_t) -> pid_t? {
        let fd = open("/proc/\(pid)/status", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return nil }
        return tracerPID(inStatus: String(decoding: buffer[..<count], as: UTF8.self))
    }

    /// The first line of a small file (/proc's), nil if it cannot be read.
    public static func firstLine(of path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 512)
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count >= 0 else { return nil }
        return String(decoding: buffer[..<count].prefix { $0 != 10 }, as: UTF8.self)
    }

    /// For an operator: why a process that should answer does not.
    public var explanation: String {
        switch self {
        case .running: return "running, but not answering"
        case .stopped: return "stopped (SIGSTOP, or a debugger): it answers when continued"
        case .traced(let tracer):
            return "held by a tracer (pid \(tracer): a debugger, strace): it answers, or finishes dying, only as that process lets it"
        case .dying(let waitingIn):
            return "dying, a thread still in the kernel\(waitingIn.map { " (waiting in \($0))" } ?? ""): "
                + "a process holds a lock it waits for; the broker's last \"I/O thread stuck\" warning names it, "
                + "and the successor starts when that process lets go or is killed"
        case .gone: return "gone: being restarted"
        }
    }
}
