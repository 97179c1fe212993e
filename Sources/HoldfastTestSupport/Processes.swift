import HoldfastPosix
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// The processes a test started, ended by pid when the test is done — never by name.
///
///     let processes = TestProcesses()
///     defer { processes.killAll() }
public final class TestProcesses: Sendable {
    private let pids = NIOLockedValueBox<Set<pid_t>>([])

    public init() {}

    /// Starts `arguments[0]` (resolved with PATH) with the given stdio fds (as `user`, if given).
    @discardableResult
    public func start(
        _ arguments: [String], stdin: Int32? = nil, stdout: Int32? = nil, stderr: Int32? = nil,
        environment: [String]? = nil, directory: String? = nil, newSession: Bool = true, user: uid_t? = nil,
        openFileLimit: (soft: UInt64, hard: UInt64?)? = nil, oomScoreAdjustment: Int32? = nil
    ) throws -> pid_t {
        var options = SpawnOptions(executable: arguments[0], arguments: arguments)
        if let openFileLimit { options.openFileLimit = openFileLimit }
        if let oomScoreAdjustment { options.oomScoreAdjustment = oomScoreAdjustment }
        // As another user: its uid as gid too, no supplementary groups but that one.
        if let user { options.user = (user, user, [user]) }
        if let environment { options.environment = environment }
        options.stdin = stdin
        options.stdout = stdout
        options.stderr = stderr ?? 2
        options.directory = directory
        options.parentDeathSignal = SIGKILL
        // Its own session (a daemon under test, a container's `kill 0`, never reach the runner).
        options.newSession = newSession
        // A binary a test has just written (a live upgrade's new one) can be "busy" for a moment:
        // a process another test forks meanwhile holds a copy of the writer's fd until its own
        // exec closes it (O_CLOEXEC acts at exec, not at fork).
        var attempts = 0
        while true {
            let pid: pid_t
            do {
                pid = try Spawner.spawn(options)
            } catch {
                attempts += 1
                guard error.errno == ETXTBSY, attempts < 50 else { throw error }
                usleep(20_000)
                continue
            }
            pids.withLockedValue { _ = $0.insert(pid) }
            return pid
        }
    }

    /// Tracks a process started some other way, so it is ended with the rest.
    public func adopt(_ pid: pid_t) {
        pids.withLockedValue { _ = $0.insert(pid) }
    }

    public func signal(_ pid: pid_t, _ signal: Int32 = SIGKILL) {
        _ = Glibc.kill(pid, signal)
    }

    /// Waits (bounded) for a process to exit and reaps it.
    public func wait(_ pid: pid_t, timeout: Duration = .seconds(10)) async throws -> ExitStatus {
        let status: ExitStatus
        do {
            status = try await withTimeout("process \(pid) to exit", timeout) { try await Spawner.waitForExit(pid) }
        } catch is TimedOut {
            // Which side hung: a process still running (and where), or one that exited and was
            // never reaped (a zombie: this process's reactor missed its pidfd).
            throw TimedOut(what: "process \(pid) to exit (\(Self.diagnosis(of: pid)))")
        }
        pids.withLockedValue { _ = $0.remove(pid) }
        return status
    }

    /// What /proc says of `pid` and of this process's reactor, for a wait that timed out.
    public static func diagnosis(of pid: pid_t) -> String {
        let state = ProcessAccount.Stat(ProcessAccount.line("/proc/\(pid)/stat"))?.state ?? "gone"
        return "state:\(state), waiting in \(ProcessAccount.line("/proc/\(pid)/wchan")); this process's reactor: "
            + "\(Reactor.shared.stalls) takeovers, \(Reactor.shared.strandedThreads) stranded"
    }

    /// SIGKILL and reap one process.
    public func kill(_ pid: pid_t) {
        _ = Glibc.kill(pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        pids.withLockedValue { _ = $0.remove(pid) }
    }

    /// SIGKILL and reap every process still tracked.
    public func killAll() {
        for pid in pids.withLockedValue({ $0 }) { kill(pid) }
    }
}

/// Waits until the closes handed to the reactor's thread so far (`Reactor.closeOnLoop`) have
/// run: a job queued after them has. No sleep: a timer is an fd of its own.
public func reactorClosesDone() async {
    await Task(executorPreference: Reactor.shared) {}.value
    // And fds from outside closed on closer threads (`ForeignCloser`), bounded.
    for _ in 0..<3000 where ForeignCloser.outstanding > 0 { try? await Task.sleep(for: .milliseconds(10)) }
}

/// The number of open fds of a process, from /proc/PID/fd.
public func openDescriptorCount(pid: pid_t = getpid()) -> Int {
    guard let directory = opendir("/proc/\(pid)/fd") else { return -1 }
    defer { closedir(directory) }
    var count = 0
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if name != "." && name != ".." { count += 1 }
    }
    // Our own directory stream's fd is in the listing only when we list ourselves.
    return pid == getpid() ? count - 1 : count
}

/// A baseline of a process's open fds: the fewest of five readings 20 ms apart. One reading
/// can catch an fd the process holds for a moment (a /proc file it reads, a connection it is
/// answering); a count compared with it later would then wait for an fd that never comes back.
public func settledDescriptorTable(pid: pid_t) async -> [Int32: String] {
    var fewest = descriptorTable(pid: pid)
    for _ in 1..<5 {
        try? await Task.sleep(for: .milliseconds(20))
        let reading = descriptorTable(pid: pid)
        if reading.count < fewest.count { fewest = reading }
    }
    return fewest
}

/// What a /proc symlink points to (for failure messages).
public func linkTarget(_ path: String) -> String {
    var buffer = [CChar](repeating: 0, count: 256)
    let count = readlink(path, &buffer, buffer.count - 1)
    return count < 0 ? "(errno \(errno))" : String(decoding: buffer[..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// This process's fds but the concurrency runtime's own timer fds, which it opens as it needs
/// them, at moments no test chooses (a full suite's isolated fd-passing test once counted one
/// more after than before): what a test that counts its fds before and after compares.
public func ownDescriptorCount() -> Int {
    descriptorTable().values.filter { $0 != "anon_inode:[timerfd]" }.count
}

/// A process's open fds, number → what it is ("pipe:[123]", "socket:[456]", a path), so a
/// failed fd count can say which ones differ.
public func descriptorTable(pid: pid_t = getpid()) -> [Int32: String] {
    guard let directory = opendir("/proc/\(pid)/fd") else { return [:] }
    defer { closedir(directory) }
    var table: [Int32: String] = [:]
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if let number = Int32(name) { table[number] = linkTarget("/proc/\(pid)/fd/\(name)") }
    }
    return table
}

/// Every process (pid, name, fd) that holds `target` (as /proc/PID/fd shows it, e.g.
/// "pipe:[123]"): who else has a pipe end, when a test finds one drained or held open.
public func holders(of target: String) -> [String] {
    guard let proc = opendir("/proc") else { return [] }
    defer { closedir(proc) }
    var found: [String] = []
    while let entry = readdir(proc) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        guard let pid = pid_t(name) else { continue }
        for (fd, link) in descriptorTable(pid: pid) where link == target {
            let comm = String(decoding: readFile("/proc/\(pid)/comm") ?? [], as: UTF8.self).trimmingSuffix("\n")
            found.append("\(pid) (\(comm)) fd \(fd)")
        }
    }
    return found.sorted()
}

extension String {
    fileprivate func trimmingSuffix(_ suffix: String) -> String { hasSuffix(suffix) ? String(dropLast(suffix.count)) : self }
}

/// The entries of `after` not in `before` (by number and target), for failure messages.
public func descriptorsAdded(_ before: [Int32: String], _ after: [Int32: String]) -> [String] {
    after.filter { before[$0.key] != $0.value }.sorted { $0.key < $1.key }.map { "\($0.key) → \($0.value)" }
}

/// A private directory under /tmp, removed with everything in it by `remove()`.
public struct TemporaryDirectory: Sendable {
    public let path: String

    public init(_ prefix: String = "holdfast-test") throws {
        var template = Array("/tmp/\(prefix).XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) != nil }
        guard made else { throw SystemError.last("mkdtemp") }
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public func file(_ name: String) -> String { "\(path)/\(name)" }

    /// Removes the directory and everything in it, in this process (no `rm` child: a fork of a
    /// large test process is slow, and waiting for it would block a concurrency thread).
    public func remove() {
        FileTree.remove(path)
    }
}

/// Reads a whole file.
public func readFile(_ path: String) -> [UInt8]? { WholeFile.read(path) }

public func writeFile(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o644) throws {
    try WholeFile.write(path, bytes, mode: mode)
}

/// Leaves a socket file nobody listens on at `path`: bound, then its socket closed, as a
/// crashed process leaves one.
public func makeStaleSocket(_ path: String) {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        for (index, byte) in path.utf8.enumerated() { raw[index] = byte }
    }
    _ = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    close(fd)
}

/// A file another uid can run or read: `path` itself if every directory above it lets others
/// through and the file lets them read it, else a copy in `directory` (which must let them in).
/// A checkout in a directory only its owner can enter — Debian 12 makes home directories 0700 —
/// holds programs and scripts a test runs as `nobody`: those must be copied out first.
public func readableByOthers(_ path: String, copyInto directory: String) throws -> String {
    guard !everyoneCanReach(path) else { return path }
    let copy = directory + "/" + (path.split(separator: "/").last.map(String.init) ?? "copy")
    if access(copy, F_OK) == 0 { return copy }
    guard let bytes = WholeFile.read(path) else { throw SystemError.last("read \(path)") }
    var info = stat()
    _ = stat(path, &info)
    try WholeFile.write(copy, bytes, mode: (info.st_mode & 0o111) != 0 ? 0o755 : 0o644)
    chmod(copy, (info.st_mode & 0o111) != 0 ? 0o755 : 0o644)  // whatever the umask
    return copy
}

/// Whether others (not the owner, not the group) may traverse every directory above `path` and
/// read it.
public func everyoneCanReach(_ path: String) -> Bool {
    var info = stat()
    guard stat(path, &info) == 0, info.st_mode & S_IROTH != 0 else { return false }
    var components = path.split(separator: "/", omittingEmptySubsequences: true).dropLast()
    while !components.isEmpty {
        let directory = "/" + components.joined(separator: "/")
        guard stat(directory, &info) == 0, info.st_mode & S_IXOTH != 0 else { return false }
        components = components.dropLast()
    }
    return true
}

/// A process as the kernel knows it: its pid and its start time (clock ticks since boot, field
/// 22 of /proc/PID/stat), so a pid the kernel gave again, at once, is never taken for the
/// process a test saw (the suite's `ns_last_pid` writes make that happen beside them).
public struct ProcessIdentity: Equatable, Sendable, CustomStringConvertible {
    public let pid: pid_t
    public let startTime: UInt64

    /// nil if there is no such process.
    public init?(_ pid: pid_t) {
        guard let (_, startTime) = Self.stat(pid) else { return nil }
        self.pid = pid
        self.startTime = startTime
    }

    static func stat(_ pid: pid_t) -> (state: Character, startTime: UInt64)? {
        guard let bytes = WholeFile.read("/proc/\(pid)/stat") else { return nil }
        let text = String(decoding: bytes, as: UTF8.self)
        guard let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 20, let state = fields[0].first, let start = UInt64(fields[19]) else { return nil }
        return (state, start)
    }

    /// Running or stopped: not exited, not a zombie, not another process under its pid.
    public var isAlive: Bool {
        guard let now = Self.stat(pid) else { return false }
        return now.startTime == startTime && now.state != "Z" && now.state != "X"
    }

    public var description: String { "pid \(pid) (started at tick \(startTime))" }
}

/// A process pinned by a pidfd opened while it ran: a signal sent later reaches it or no one,
/// never a process the kernel gave its pid since (the suite's `ns_last_pid` writes make that
/// instant, and a start time in clock ticks cannot tell two processes of one tick apart). A
/// test's deferred `kill(pid, SIGCONT)` once continued another test's stopped broker that way.
public final class PinnedProcess: Sendable {
    public let pid: pid_t
    private let pidfd: Int32

    /// nil if there is no such process.
    public init?(_ pid: pid_t) {
        let pidfd = PidFD.open(pid)
        guard pidfd >= 0 else { return nil }
        self.pid = pid
        self.pidfd = pidfd
    }

    deinit { close(pidfd) }

    /// False once it has exited (or on another error).
    @discardableResult
    public func signal(_ signal: Int32) -> Bool {
        PidFD.send(signal, through: pidfd)
    }
}

/// Ends what a daemon on `runDirectory` left in its process cgroups and removes them: a test
/// that killed its daemon (no stop to do it) leaves no process and no directory behind.
public func endDaemonCgroups(runDirectory: String) {
    guard case .success(let cgroups) = ProcessCgroups.open(tag: ProcessCgroups.tag(runDirectory: runDirectory)) else { return }
    cgroups.endEverythingBlocking(within: .seconds(2))
    cgroups.removeDirectory()
}
