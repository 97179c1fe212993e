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

    public var description: String {
        "cannot start \(executable): \(step) failed: \(String(cString: strerror(errno))) (errno \(errno))"
    }
}

public enum Spawner {
    /// fork + exec. A failure in the child before exec (bad path, bad cwd, setuid refused) is
    /// reported here as a `SpawnError`, not as a mysterious exit status later.
    ///
    /// With a `parentDeathSignal`, the fork happens on one dedicated thread that lives as long as
    /// the process: Linux sends that signal when the *forking thread* exits, and the concurrency
    /// pool's threads come and go — a child forked from one of them would be killed at random.
    public static func spawn(_ options: SpawnOptions) throws(SpawnError) -> pid_t {
        try spawn(options, reaper: nil).pid
    }

    /// `spawn`, the child registered with `reaper` as it is forked (`ChildReaper.spawn`).
    static func spawn(_ options: SpawnOptions, reaper: ChildReaper?) throws(SpawnError) -> (pid: pid_t, child: ChildReaper.Child?) {
        if options.parentDeathSignal != nil {
            return try SpawnThread.shared.run { () throws(SpawnError) -> (pid: pid_t, child: ChildReaper.Child?) in
                try spawnHere(options, reaper: reaper)
            }
        }
        return try spawnHere(options, reaper: reaper)
    }

    private static func spawnHere(_ options: SpawnOptions, reaper: ChildReaper?) throws(SpawnError) -> (pid: pid_t, child: ChildReaper.Child?) {
        let argv = CStringArray(options.arguments)
        let envp = CStringArray(options.environment)
        let groups = options.user?.groups ?? []
        var step: UnsafePointer<CChar>?
        var child: ChildReaper.Child?
        let pid: pid_t = options.executable.withCString { path in
            withOptionalCString(options.directory) { directory in
                groups.withUnsafeBufferPointer { groupBuffer in
                    options.keepDescriptors.withUnsafeBufferPointer { keep in
                        var raw = hf_spawn_options()
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
                        guard let reaper else { return hf_spawn(&raw, &step) }
                        var reportFD: Int32 = -1
                        let forked = reaper.registering { hf_spawn_fork(&raw, &reportFD, &step) }
                        child = forked.child
                        guard forked.pid > 0 else { return forked.pid }
                        // Outside the reaper's lock: the child's set-up and exec can block.
                        return hf_spawn_result(reportFD, &step) == 0 ? forked.pid : -1
                    }
                }
            }
        }
        guard pid > 0 else {
            let error = Glibc.errno
            // A child that failed before exec exits 127: the reaper reaps it, nobody waits.
            if let reaper, let child { reaper.abandon(child) }
            throw SpawnError(executable: options.executable, step: step.map { String(cString: $0) } ?? "spawn", errno: error)
        }
        return (pid, child)
    }

    /// Reaps `pid` if it has exited, without blocking.
    public static func reap(_ pid: pid_t) -> ExitStatus? {
        var exited: Int32 = 0
        var code: Int32 = 0
        guard hf_wait(pid, 1, &exited, &code) == pid else { return nil }
        return exited == 1 ? .exited(code) : .signaled(code)
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
            if let status = reap(pid) { return status }
            try await handle.waitReadable()
            if let status = reap(pid) { return status }
            // Readable but not reapable: someone else reaped it (a subreaper's loop).
            var exited: Int32 = 0
            var code: Int32 = 0
            if hf_wait(pid, 1, &exited, &code) < 0, Glibc.errno == ECHILD {
                throw SystemError("waitpid(\(pid))", errno: .noChildProcess)
            }
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

/// A thread that lives for the whole process and runs forks that set PR_SET_PDEATHSIG.
final class SpawnThread: @unchecked Sendable {
    static let shared = SpawnThread()

    private let lock = ConditionLock(value: 0)  // 0: idle, 1: work queued
    private var work: (() -> Void)?

    private init() {
        let box = Unmanaged.passRetained(self)
        var thread = pthread_t()
        let created = pthread_create(&thread, nil, { context in
            Unmanaged<SpawnThread>.fromOpaque(context!).takeRetainedValue().loop()
            return nil
        }, box.toOpaque())
        precondition(created == 0, "cannot start the spawn thread (errno \(created))")
        pthread_detach(thread)
    }

    private func loop() {
        while true {
            lock.lock(whenValue: 1)
            let job = work
            work = nil
            lock.unlock(withValue: 0)
            job?()
        }
    }

    /// Runs `body` on the spawn thread and waits for it. Calls are serialised.
    func run<T>(_ body: @escaping () throws(SpawnError) -> T) throws(SpawnError) -> T {
        let done = ConditionLock(value: 0)
        var result: Result<T, SpawnError>?
        submitLock.lock()
        defer { submitLock.unlock() }
        lock.lock(whenValue: 0)
        work = {
            done.lock()
            do throws(SpawnError) {
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

    private let submitLock = NIOLock()
}
