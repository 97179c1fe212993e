import CHoldfastShims
import HoldfastCore
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// How a process ended.
public enum ExitStatus: Sendable, Equatable, Codable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)

    /// The shell's convention: the exit code, or 128 + the signal number.
    public var code: Int32 {
        switch self {
        case .exited(let code): return code
        case .signaled(let signal): return 128 + signal
        }
    }

    public var description: String {
        switch self {
        case .exited(let code): return "exit code \(code)"
        case .signaled(let signal): return "killed by signal \(signal) (\(signalName(signal)))"
        }
    }
}

public func signalName(_ signal: Int32) -> String {
    SignalNames.name(signal)
}

/// What to start and how.
public struct SpawnOptions: Sendable {
    public var executable: String
    public var arguments: [String]
    public var environment: [String]
    public var directory: String?
    public var stdin: Int32?
    public var stdout: Int32?
    public var stderr: Int32?
    /// setsid() and make `stdin` (a pty slave) the controlling terminal.
    public var controllingTerminal = false
    public var newSession = false
    public var user: (uid: uid_t, gid: gid_t, groups: [gid_t])?
    /// fds the child keeps beyond 0-2 (at the same numbers).
    public var keepDescriptors: [Int32] = []
    /// Signal the child receives if the spawning thread's process dies (PR_SET_PDEATHSIG).
    public var parentDeathSignal: Int32?
    /// The child's limits on open files (hard nil: unchanged); by default the soft limit this
    /// process had before it raised its own (`ResourceLimits.raiseOpenFileLimit`), else inherited.
    public var openFileLimit: (soft: UInt64, hard: UInt64?)? = ResourceLimits.childOpenFileSoftLimit.map { ($0, nil) }
    /// The child's OOM score adjustment; by default the one this process had before it protected
    /// itself (`OOMScore.protect`), else inherited.
    public var oomScoreAdjustment: Int32? = OOMScore.childAdjustment
    /// An open `cgroup.procs` of a cgroup v2 directory: the child joins that cgroup before
    /// anything else, so all it starts is born inside it (`ProcessCgroups`).
    public var cgroupProcs: Int32?
    /// A seccomp program (raw `struct sock_filter` entries, 8 bytes each) the child installs
    /// before its ids change, kept across its exec and by all it starts (`SignalGuard`).
    public var seccompFilter: [UInt8]?

    /// `arguments[0]` is the program name the child sees; `executable` is resolved with PATH when
    /// it has no slash.
    public init(executable: String, arguments: [String], environment: [String] = SpawnOptions.inheritedEnvironment()) {
        self.executable = executable
        self.arguments = arguments
        self.environment = environment
    }

    public static func inheritedEnvironment() -> [String] {
        var result: [String] = []
        var cursor = environ
        while let entry = cursor.pointee {
            result.append(String(cString: entry))
            cursor += 1
        }
        return result
    }
}

/// A process could not be started: which step failed and why.
public struct SpawnError: Error, Sendable, CustomStringConvertible {
    public var executable: String
    public var step: String
    public var errno: Int32
    /// The child did not reach its exec within this, and was killed (`spawnAwaitingExec`).
    public var timedOutAfter: Duration? = nil

    public var description: String {
        if let timedOutAfter {
            return "cannot start \(executable): it had not reached its exec \(timedOutAfter.spoken) after its fork (its working directory or binary on a file system that does not answer?): killed"
        }
        return "cannot start \(executable): \(step) failed: \(String(cString: strerror(errno))) (errno \(errno))"
    }
}

public enum Spawner {
    /// fork + exec. A failure in the child before exec (bad path, bad cwd, setuid refused) is
    /// reported here as a `SpawnError`, not as a mysterious exit status later.
    ///
    /// The fork happens on one thread that lives as long as the process (`SpawnThread`): Linux
    /// sends a `parentDeathSignal` when the *forking thread* exits, and a child that makes its
    /// parent its tracer can be let go by that thread alone.
    public static func spawn(_ options: SpawnOptions) throws(SpawnError) -> pid_t {
        try spawn(options, reaper: nil).pid
    }

    /// `spawn`, the child registered with `reaper` as it is forked (`ChildReaper.spawn`). The
    /// wait for its exec blocks the calling thread.
    static func spawn(_ options: SpawnOptions, reaper: ChildReaper?) throws(SpawnError) -> (pid: pid_t, child: ChildReaper.Child?) {
        let forked = try fork(options, reaper: reaper)
        var step: UnsafePointer<CChar>?
        guard hf_spawn_result(forked.report, &step) == 0 else {
            throw failed(forked, options: options, step: step, errno: Glibc.errno, reaper: reaper)
        }
        return (forked.pid, forked.child)
    }

    /// `spawn`, waiting for the child's exec without holding a thread: the report pipe is read
    /// through the reactor. A child's set-up and exec can block for as long as a file system
    /// hangs (its directory or binary on a stalled virtiofs, 9p or NFS mount); waited for on a
    /// thread of the cooperative pool — one per CPU, which does not grow — as many such creates
    /// as the guest has CPUs stopped the whole daemon: its control socket, the bridge's
    /// requests, exit reports, the watchdog's keep-alive (and then systemd killed it with every
    /// container).
    ///
    /// `within`: a child that has not reached its exec by then is killed, and this throws
    /// (`SpawnError.timedOutAfter`). A fatal signal ends a task a hung file system holds (FUSE,
    /// NFS and virtiofs waits are killable; so is a frozen cgroup's).
    static func spawnAwaitingExec(
        _ options: SpawnOptions, reaper: ChildReaper?, within limit: Duration? = nil
    ) async throws(SpawnError) -> (pid: pid_t, child: ChildReaper.Child?) {
        let forked = try fork(options, reaper: reaper)
        let report: AsyncFD
        do {
            report = try AsyncFD(adopting: forked.report)
        } catch {
            // No reactor watch to be had (epoll's limit): the blocking wait, as before — on a
            // blocking fd again (the adoption made it non-blocking before its watch failed,
            // and a read would find nothing yet and take the child for started).
            let flags = fcntl(forked.report, F_GETFL)
            if flags >= 0 { _ = fcntl(forked.report, F_SETFL, flags & ~O_NONBLOCK) }
            var step: UnsafePointer<CChar>?
            guard hf_spawn_result(forked.report, &step) == 0 else {
                throw failed(forked, options: options, step: step, errno: Glibc.errno, reaper: reaper)
            }
            return (forked.pid, forked.child)
        }
        defer { report.close() }
        // Past the limit the child is killed, once, and only while its exec is still awaited: a
        // kill after it was taken for started would end a process its create reported running.
        let wait = NIOLockedValueBox(ExecWait.awaited)
        let timer = limit.map { limit in
            TimeoutWheel.shared.schedule(after: limit) {
                let kill = wait.withLockedValue { state -> Bool in
                    guard state == .awaited else { return false }
                    state = .timedOut
                    return true
                }
                guard kill else { return }
                if let reaper, let child = forked.child { _ = reaper.signal(child, SIGKILL) } else { Glibc.kill(forked.pid, SIGKILL) }
            }
        }
        // End-of-file: the exec closed the (close-on-exec) write end. Otherwise the child's
        // failure record, written whole (8 bytes) before it exits.
        let record = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 8)
        defer { record.deallocate() }
        var filled = 0
        while filled < record.count {
            let count = (try? await report.read(into: UnsafeMutableRawBufferPointer(rebasing: record[filled...]))) ?? 0
            if count == 0 { break }
            filled += count
        }
        if let timer { TimeoutWheel.shared.cancel(timer) }
        let timedOut = wait.withLockedValue { state -> Bool in
            defer { state = .answered }
            return state == .timedOut
        }
        if timedOut, let limit {
            // Its end-of-file came from its death, not from an exec. Waited for a moment (what it
            // was in may not let it die at once): its cgroup can go only once it is gone.
            if let reaper, let child = forked.child {
                let reaped = Task { await reaper.wait(child) }
                _ = await reaped.value(within: .seconds(5))
            }
            var error = reaper == nil ? failed(forked, options: options, step: nil, errno: ETIMEDOUT, reaper: nil)
                : SpawnError(executable: options.executable, step: "", errno: ETIMEDOUT)
            error.step = "waiting for its exec"
            error.timedOutAfter = limit
            throw error
        }
        var step: UnsafePointer<CChar>?
        let error = hf_spawn_failure_decode(record.baseAddress, filled, &step)
        guard error == 0 else { throw failed(forked, options: options, step: step, errno: error, reaper: reaper) }
        return (forked.pid, forked.child)
    }

    /// Where the wait for a child's exec stands (`spawnAwaitingExec`'s limit).
    private enum ExecWait: Sendable {
        case awaited, timedOut, answered
    }

    /// A child forked, its exec not yet known (`report`: the pipe its failure record would come
    /// through).
    private struct Forked {
        var pid: pid_t
        var child: ChildReaper.Child?
        var report: Int32
    }

    /// The error of a child that failed before its exec (it exits 127: the reaper reaps it and
    /// nobody waits; without a reaper it is reaped here).
    private static func failed(_ forked: Forked, options: SpawnOptions, step: UnsafePointer<CChar>?, errno: Int32, reaper: ChildReaper?) -> SpawnError {
        if let reaper, let child = forked.child {
            reaper.abandon(child)
        } else if reaper == nil {
            hf_reap_failed_child(forked.pid)
        }
        return SpawnError(executable: options.executable, step: step.map { String(cString: $0) } ?? "spawn", errno: errno)
    }

    private static func fork(_ options: SpawnOptions, reaper: ChildReaper?) throws(SpawnError) -> Forked {
        let argv = CStringArray(options.arguments)
        let envp = CStringArray(options.environment)
        let groups = options.user?.groups ?? []
        var step: UnsafePointer<CChar>?
        var child: ChildReaper.Child?
        var failure: Int32 = 0
        var report: Int32 = -1
        let pid: pid_t = options.executable.withCString { path in
            withOptionalCString(options.directory) { directory in
                groups.withUnsafeBufferPointer { groupBuffer in
                    options.keepDescriptors.withUnsafeBufferPointer { keep in
                        (options.seccompFilter ?? []).withUnsafeBytes { filter in
                            var raw = hf_spawn_options()
                            if options.seccompFilter != nil, let base = filter.baseAddress {
                                raw.seccomp_filter = base
                                raw.seccomp_filter_length = Int32(filter.count / 8)
                            }
                            raw.path = path
                            raw.argv = UnsafePointer(argv.pointer)
                            raw.envp = UnsafePointer(envp.pointer)
                            raw.cwd = directory
                            raw.stdin_fd = options.stdin ?? -1
                            raw.stdout_fd = options.stdout ?? -1
                            raw.stderr_fd = options.stderr ?? -1
                            raw.controlling_tty = options.controllingTerminal ? 1 : 0
                            raw.new_session = options.newSession ? 1 : 0
                            if let user = options.user {
                                raw.set_ids = 1
                                raw.uid = user.uid
                                raw.gid = user.gid
                                raw.groups = groupBuffer.baseAddress
                                raw.ngroups = Int32(groupBuffer.count)
                            }
                            raw.pdeathsig = options.parentDeathSignal ?? 0
                            raw.keep_fds = keep.baseAddress
                            raw.nkeep_fds = Int32(keep.count)
                            raw.reset_signals = 1
                            if let adjustment = options.oomScoreAdjustment {
                                raw.set_oom_score_adj = 1
                                raw.oom_score_adj = adjustment
                            }
                            if let procs = options.cgroupProcs {
                                raw.join_cgroup = 1
                                raw.cgroup_procs_fd = procs
                            }
                            if let limit = options.openFileLimit {
                                raw.nofile_soft = limit.soft
                                raw.nofile_hard = limit.hard ?? 0
                            }
                            // The fork alone on the spawn thread (the child's parent for good); the
                            // wait for its exec here, on the caller's: the child's set-up and exec can
                            // block (a directory or binary on a hung file system), and the spawn
                            // thread serves every other fork and lets go of tracees meanwhile.
                            var reportFD: Int32 = -1
                            let forked = SpawnThread.shared.run { () -> (pid: pid_t, child: ChildReaper.Child?) in
                                var options = raw
                                // errno is the spawn thread's: read here, where the fork failed, or
                                // the caller reads its own thread's (a fork refused for want of a
                                // task said "Success (errno 0)").
                                let fork = { () -> pid_t in
                                    let pid = hf_spawn_fork(&options, &reportFD, &step)
                                    if pid < 0 { failure = Glibc.errno }
                                    return pid
                                }
                                guard let reaper else { return (fork(), nil) }
                                return reaper.registering(fork)
                            }
                            child = forked.child
                            report = reportFD
                            return forked.pid
                        }
                    }
                }
            }
        }
        guard pid > 0 else {
            throw SpawnError(executable: options.executable, step: step.map { String(cString: $0) } ?? "spawn", errno: failure)
        }
        // The wait for its exec is the caller's, outside the spawn thread and the reaper's lock.
        return Forked(pid: pid, child: child, report: report)
    }

    /// What one waitpid(WNOHANG) found.
    enum WaitOutcome {
        case nothing
        case failed(errno: Int32)
        case exited(pid_t, ExitStatus)
        /// A child that made this process its tracer stopped (`UnwantedTracee`): still there.
        case stopped(pid_t, signal: Int32)
    }

    /// One waitpid(`pid`, WNOHANG).
    static func waitOnce(_ pid: pid_t) -> WaitOutcome {
        var kind: Int32 = 0
        var code: Int32 = 0
        let got = hf_wait(pid, 1, &kind, &code)
        if got < 0 { return .failed(errno: Glibc.errno) }
        guard got > 0 else { return .nothing }
        switch kind {
        case 1: return .exited(got, .exited(code))
        case 2: return .stopped(got, signal: code)
        default: return .exited(got, .signaled(code))
        }
    }

    /// Reaps `pid` if it has exited, without blocking; a stop of it as a tracee of ours is let
    /// go on the way (`UnwantedTracee`). Throws only when `pid` is no child of this process.
    static func reapChecked(_ pid: pid_t) throws(SystemError) -> ExitStatus? {
        while true {
            switch waitOnce(pid) {
            case .nothing: return nil
            case .failed(let errno):
                guard errno == ECHILD else { return nil }
                throw SystemError("waitpid(\(pid))", errno: .noChildProcess)
            case .exited(_, let status): return status
            case .stopped(_, let signal): UnwantedTracee.letGo(pid, stoppedBy: signal)
            }
        }
    }

    /// Reaps `pid` if it has exited, without blocking.
    public static func reap(_ pid: pid_t) -> ExitStatus? {
        (try? reapChecked(pid)) ?? nil
    }

    /// Waits for `pid` (a child of this process) to exit and reaps it, suspending the task — not
    /// a thread — through a pidfd.
    public static func waitForExit(_ pid: pid_t) async throws -> ExitStatus {
        let pidfd = hf_pidfd_open(pid)
        guard pidfd >= 0 else {
            if let status = reap(pid) { return status }
            throw SystemError.last("pidfd_open(\(pid))")
        }
        let handle = try AsyncFD(adopting: pidfd)
        defer { handle.close() }
        while true {
            if let status = try reapChecked(pid) { return status }
            // Readable but not reapable and no child of ours (ECHILD, thrown): someone else
            // reaped it (a subreaper's loop).
            try await handle.waitReadable()
        }
    }
}

/// A NULL-terminated C array of C strings that lives as long as this object.
final class CStringArray {
    let pointer: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>
    private let count: Int

    init(_ strings: [String]) {
        count = strings.count
        pointer = .allocate(capacity: strings.count + 1)
        for (index, string) in strings.enumerated() { pointer[index] = strdup(string) }
        pointer[strings.count] = nil
    }

    deinit {
        for index in 0..<count { free(pointer[index]) }
        pointer.deallocate()
    }
}

func withOptionalCString<R>(_ string: String?, _ body: (UnsafePointer<CChar>?) -> R) -> R {
    guard let string else { return body(nil) }
    return string.withCString { body($0) }
}

/// The one thread every child of this process is forked on, living as long as the process.
///
/// Why one: a child's parent is the *thread* that forked it, and two things go by that thread.
/// PR_SET_PDEATHSIG fires when it exits, and the concurrency pool's threads come and go (a child
/// forked from one would be killed at random). And a child that calls `ptrace(PTRACE_TRACEME)`
/// makes that thread its tracer, and only the tracer thread can let it go (`UnwantedTracee`): a
/// pool thread cannot be asked to, and when it exits its tracees are let go with their signal
/// unchanged, an exec's SIGTRAP included, which kills them.
///
/// In `holdfast` it is the main thread (`serveOnThisThread`): the kernel also gives it the
/// orphans the subreaper takes in (a runc container's init once runc has exited, what a
/// process left running), since it hands them to the group's first live thread. Elsewhere (the
/// test runner) it is a thread of its own, started on first use.
public final class SpawnThread: @unchecked Sendable {
    private static let instance = NIOLockedValueBox<SpawnThread?>(nil)

    static var shared: SpawnThread {
        instance.withLockedValue { existing in
            if let existing { return existing }
            let made = SpawnThread()
            made.startThread()
            existing = made
            return made
        }
    }

    private let lock = ConditionLock(value: 0)  // 0: idle, 1: work queued
    private var work: (() -> Void)?
    /// The serving thread, once it serves.
    private let serving = NIOLockedValueBox<pthread_t?>(nil)

    private init() {}

    /// Makes the calling thread (the main thread: the first live thread of the process, to which
    /// the kernel reparents orphans) the spawn thread, starts `start` as a detached task, and
    /// serves forks for the rest of the process's life. Call it before anything is spawned.
    public static func serveOnThisThread(running start: @escaping @Sendable () async -> Void) -> Never {
        let spawner = instance.withLockedValue { existing -> SpawnThread in
            precondition(existing == nil, "the spawn thread is chosen before anything is spawned")
            let made = SpawnThread()
            existing = made
            return made
        }
        Task.detached { await start() }
        spawner.loop()
    }

    private func startThread() {
        let box = Unmanaged.passRetained(self)
        var thread = pthread_t()
        let created = pthread_create(&thread, nil, { context in
            Unmanaged<SpawnThread>.fromOpaque(context!).takeRetainedValue().loop()
        }, box.toOpaque())
        precondition(created == 0, "cannot start the spawn thread (errno \(created))")
        pthread_detach(thread)
    }

    private func loop() -> Never {
        serving.withLockedValue { $0 = pthread_self() }
        while true {
            lock.lock(whenValue: 1)
            let job = work
            work = nil
            lock.unlock(withValue: 0)
            job?()
        }
    }

    /// Whether the caller runs on the spawn thread.
    var isCurrent: Bool {
        serving.withLockedValue { $0.map { pthread_equal($0, pthread_self()) != 0 } ?? false }
    }

    /// Runs `body` on the spawn thread and waits for it (at once when called there). Calls are
    /// serialised.
    func run<T, Failure: Error>(_ body: @escaping () throws(Failure) -> T) throws(Failure) -> T {
        if isCurrent { return try body() }
        let done = ConditionLock(value: 0)
        var result: Result<T, Failure>?
        submitLock.lock()
        defer { submitLock.unlock() }
        lock.lock(whenValue: 0)
        work = {
            done.lock()
            do throws(Failure) {
                result = .success(try body())
            } catch {
                result = .failure(error)
            }
            done.unlock(withValue: 1)
        }
        lock.unlock(withValue: 1)
        done.lock(whenValue: 1)
        done.unlock()
        return try result!.get()
    }

    /// `run` for work that cannot fail.
    public static func perform<T>(_ body: @escaping () -> T) -> T {
        shared.run { () throws(Never) -> T in body() }
    }

    private let submitLock = NIOLock()
}
