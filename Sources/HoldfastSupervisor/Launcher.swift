import HoldfastCore
import HoldfastPosix
import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// Starts container processes (runtime `direct`) and hands their host-side stdio to the broker.
///
/// The child gets its ends of the pipes (or the pty slave as its controlling terminal); the
/// host-side ends go to the broker by SCM_RIGHTS with the stream descriptions, and the
/// supervisor closes its copies at once: it keeps nothing it does not need.
struct Launcher {
    /// Output pipes get 1 MiB (the default pipe-max-size): more room for a process to keep
    /// writing while the host is away before back-pressure blocks it.
    static let outputPipeCapacity = 1 << 20

    enum Failure: Error {
        case invalid(HoldfastError)
    }

    static let defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    static let defaultEnvironment = [defaultPath]
    /// A terminal's type when the host did not say (`host run --tty` passes its own `TERM`).
    static let defaultTerminalType = "TERM=xterm"

    /// A direct process's environment: the spec's, plus what a login would give it and the
    /// spec left out — `PATH`, `HOME` (the user's home directory, `/` without one) and, with a
    /// terminal, `TERM` — the way runc and podman fill in a container's.
    static func environment(for spec: ProcessSpec, home: String?) -> [String] {
        var environment = spec.env ?? []
        let named = Set(environment.map { $0.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? $0 })
        if !named.contains("PATH") { environment.append(defaultPath) }
        if !named.contains("HOME") { environment.append("HOME=" + (home.flatMap { $0.isEmpty ? nil : $0 } ?? "/")) }
        if spec.tty, !named.contains("TERM") { environment.append(defaultTerminalType) }
        return environment
    }

    /// The error for a program that could not be started: exec's ENOENT is the shell's 127
    /// ("command not found"), EACCES/ENOEXEC/EISDIR its 126 ("cannot execute"); a fork refused
    /// for want of a task is `too-many-processes` (it may succeed later); a failure before exec
    /// (the working directory, the user) is Holdfast's own.
    static func startFailure(_ error: SpawnError) -> HoldfastError {
        if let failure = forkFailure(error) { return failure }
        guard error.step.hasPrefix("exec") else { return HoldfastError(.startFailed, error.description) }
        switch error.errno {
        case ENOENT, ENOTDIR:
            return HoldfastError(.commandNotFound, error.description)
        case EACCES, ENOEXEC, EISDIR, EPERM, ETXTBSY:
            return HoldfastError(.cannotExecute, error.description)
        default:
            return HoldfastError(.startFailed, error.description)
        }
    }

    /// The error for a spawn that failed in this process, before there was a child (its report
    /// pipe, the fork), whatever it was starting: for want of a task or an fd it says so with
    /// the code a caller can wait on; nil when the child's set-up or exec failed.
    static func forkFailure(_ error: SpawnError) -> HoldfastError? {
        switch (error.step, error.errno) {
        case ("fork", EAGAIN):
            HoldfastError(
                .tooManyProcesses,
                "\(error.description): the guest has no task left for it (a pids limit on the daemon's cgroup such as its unit's TasksMax=, or kernel.pid_max / kernel.threads-max); nothing was started, try again once processes end"
            )
        case ("pipe", EMFILE), ("pipe", ENFILE):
            HoldfastError(.tooManyOpenFiles, error.description)
        case ("fork", _), ("pipe", _):
            HoldfastError(.startFailed, error.description)
        default:
            nil
        }
    }

    /// Validates a spec without starting anything; the error names the field.
    /// Every string that ends up as a C string (a path, an argument, a user name) or names
    /// something: a NUL byte would cut it short silently ("root\0x" looked up as "root").
    static func refuseNULBytes(_ spec: ProcessSpec) throws(HoldfastError) {
        var fields: [(String, String?)] = [
            ("id", spec.id), ("cwd", spec.cwd), ("user", spec.user), ("bundle", spec.bundle), ("container", spec.container),
            ("idempotencyKey", spec.idempotencyKey),
        ]
        fields += spec.argv.enumerated().map { ("argv[\($0.offset)]", $0.element) }
        fields += (spec.env ?? []).enumerated().map { ("env[\($0.offset)]", $0.element) }
        for (name, stream) in [("stdin", spec.stdin), ("stdout", spec.stdout), ("stderr", spec.stderr)] {
            fields.append(("\(name).address", stream?.address))
            fields.append(("\(name).token", stream?.token))
        }
        for case let (name, value?) in fields where value.utf8.contains(0) {
            throw HoldfastError(.badRequest, "\(name) contains a NUL byte")
        }
    }

    static func validate(_ spec: ProcessSpec) throws(HoldfastError) {
        guard !spec.id.isEmpty, spec.id.utf8.count <= 256 else {
            throw HoldfastError(.badRequest, "id must be 1 to 256 bytes")
        }
        try refuseNULBytes(spec)
        if let refusal = ProcessIdentifier.controlCharacterRefusal(spec.id) { throw HoldfastError(.badRequest, "id \(refusal)") }
        try ProcessSpec.checkIdempotencyKey(spec.idempotencyKey)
        switch spec.runtime ?? .direct {
        case .direct:
            guard let program = spec.argv.first, !program.isEmpty else {
                throw HoldfastError(.badRequest, "argv must name a program")
            }
            if spec.bundle != nil || spec.container != nil {
                throw HoldfastError(.badRequest, "bundle and container need runtime 'runc'")
            }
            if let user = spec.user, UserAccount.forProcess(user) == nil {
                throw HoldfastError(.badUser, "user: no such user '\(user)' (a name from the password database, or a number)")
            }
        case .runc:
            try RuncRuntime.validate(spec)
        }
        for (name, stream) in [("stdin", spec.stdin), ("stdout", spec.stdout), ("stderr", spec.stderr)] {
            guard let stream else { continue }
            if let refusal = TerminalText.controlCharacterRefusal(stream.address, "addresses") {
                throw HoldfastError(.badAddress, "\(name).address \(refusal)")
            }
            do {
                _ = try SocketAddress(parsing: stream.address)
            } catch {
                throw HoldfastError(.badAddress, "\(name).address: \(error)")
            }
            // A tty's input is relayed in the mode of its output (one stream, both ways).
            let tty = spec.tty && name == "stdin" && spec.stdout != nil
            let mode = tty ? spec.stdout!.mode : stream.mode
            if mode == .resumable {
                guard let token = stream.token, !token.isEmpty, token.utf8.count <= StreamHello.maxTokenLength else {
                    let why = tty ? "a tty's input is resumable like its stdout and needs a token" : "resumable mode needs a token"
                    throw HoldfastError(.badRequest, "\(name): \(why) of 1 to \(StreamHello.maxTokenLength) bytes")
                }
                guard stream.secret != nil else {
                    let why = tty ? "a tty's input is resumable like its stdout and needs" : "resumable mode needs"
                    throw HoldfastError(.badRequest, "\(name): \(why) the stream's secret (hex, 16 to 64 bytes, chosen by the host)")
                }
            }
        }
        if spec.tty, spec.stderr != nil {
            throw HoldfastError(.badRequest, "stderr: a tty process has one output stream (stdout)")
        }
        // Its terminal's master is that stream: without it the master would be closed as the
        // process starts, which hangs its terminal up (SIGHUP at its first read or write).
        if spec.tty, spec.stdout == nil {
            throw HoldfastError(.badRequest, "stdout: a tty process needs its output stream (stdout), which carries its terminal")
        }
        // The broker checks the streams again when they are handed over, after the process has
        // started; nothing it would refuse may get that far.
        let streams = streamDescriptions(spec)
        if !streams.isEmpty {
            try AdoptCheck.validate(AdoptRequest(process: spec.id, streams: streams), descriptorCount: streams.count)
        }
    }

    /// What `launch` produced: the child's pid, and what to send the broker.
    struct Started {
        var pid: pid_t
        /// Its registration with the reaper: made as it was forked (runtime `direct`), or as
        /// soon as runc's pid file named it (`ChildReaper.adopt`); nil only if runc's process
        /// was no child of ours by then (waited for by pid).
        var child: ChildReaper.Child?
        var adopt: AdoptRequest
        var descriptors: [Int32]
        /// Its cgroup's name (`ProcessCgroups`), for a direct process where the daemon has them.
        var cgroup: String? = nil
        /// Why a direct process runs without a cgroup although the daemon has them.
        var cgroupFailure: SystemError? = nil
        /// A runc container process's memory cgroup's OOM kill count, read as it started.
        var oomCounter: OOMKillCounter? = nil
    }

    /// A process's stdio before it starts: the ends the process gets, the ends the broker gets,
    /// and how the broker should relay each.
    struct Stdio {
        var childEnds: [Int32] = []
        var hostEnds: [Int32] = []
        var streams: [StreamDescription] = []
        /// What the process (or the runtime that starts it) gets as fd 0, 1 and 2; nil is /dev/null.
        var stdin: Int32?
        var stdout: Int32?
        var stderr: Int32?

        func closeAll() {
            for fd in childEnds + hostEnds { _ = close(fd) }
        }

        /// After the start: the process has its copies.
        mutating func closeChildEnds() {
            for fd in childEnds { _ = close(fd) }
            childEnds = []
        }
    }

    /// The streams a spec hands the broker, fd indexes counting its host ends: for a tty one
    /// stream (the pty master, fd 0) carrying stdout and, as its input, stdin; otherwise stdin,
    /// stdout and stderr, those present, in that order.
    static func streamDescriptions(_ spec: ProcessSpec) -> [StreamDescription] {
        if spec.tty {
            guard let output = spec.stdout else { return [] }
            return [StreamDescription(
                kind: .tty, fd: 0, address: output.address, mode: output.mode, token: output.token, secret: output.secret,
                inputAddress: spec.stdin?.address, inputToken: spec.stdin?.token, inputSecret: spec.stdin?.secret)]
        }
        var streams: [StreamDescription] = []
        for (kind, stream) in [(StreamKind.stdin, spec.stdin), (.stdout, spec.stdout), (.stderr, spec.stderr)] {
            guard let stream else { continue }
            streams.append(StreamDescription(
                kind: kind, fd: streams.count, address: stream.address, mode: stream.mode, token: stream.token, secret: stream.secret))
        }
        return streams
    }

    /// Creates the pipes (or, with `terminal`, the pty) for a spec. A tty spec without
    /// `terminal` gets only its stream description: the runtime brings the pty master (runc's
    /// console socket) and appends it as host end 0.
    static func makeStdio(_ spec: ProcessSpec, terminal: Bool) throws(HoldfastError) -> Stdio {
        var stdio = Stdio()
        // Host ends below are made in the order of these descriptions' fd indexes.
        stdio.streams = streamDescriptions(spec)
        do throws(SystemError) {
            if spec.tty {
                if terminal {
                    let size = WindowSize(rows: spec.rows ?? 24, columns: spec.columns ?? 80)
                    let pty = try PseudoTerminal.open(size: size)
                    stdio.childEnds.append(pty.slave)
                    stdio.hostEnds.append(pty.master)
                    stdio.stdin = pty.slave
                    stdio.stdout = pty.slave
                    stdio.stderr = pty.slave
                }
            } else {
                if spec.stdin != nil {
                    let pipe = try PipeEnds.make()
                    stdio.childEnds.append(pipe.read)
                    stdio.hostEnds.append(pipe.write)
                    stdio.stdin = pipe.read
                }
                for (kind, stream) in [(StreamKind.stdout, spec.stdout), (.stderr, spec.stderr)] where stream != nil {
                    let pipe = try PipeEnds.make(capacity: outputPipeCapacity)
                    stdio.childEnds.append(pipe.write)
                    stdio.hostEnds.append(pipe.read)
                    if kind == .stdout { stdio.stdout = pipe.write } else { stdio.stderr = pipe.write }
                }
            }
        } catch {
            stdio.closeAll()
            // The pty multiplexer's ENOSPC ("No space left on device") means no terminal is left.
            if error.operation == "posix_openpt", error.number == ENOSPC {
                throw HoldfastError(
                    .stdioFailed, "\(error): every pseudo-terminal of the guest is in use (kernel.pty.max); try again once terminals close")
            }
            throw HoldfastError(.stdioFailed, "\(error)")
        }
        return stdio
    }

    /// Creates the stdio, starts the process (runtime `direct`), and returns the host-side fds
    /// for the broker. On failure nothing is left open and no process is left running.
    /// `signalGuard`: the seccomp program it starts under (`SignalGuard`), if any;
    /// `startTimeout`: how long the child may take to reach its exec before it is killed.
    static func start(
        _ spec: ProcessSpec, reaper: ChildReaper, cgroups: ProcessCgroups?, signalGuard: SignalGuard.Programs? = nil,
        startTimeout: Duration? = nil
    ) async throws(HoldfastError) -> Started {
        try validate(spec)
        let account = spec.user.flatMap(UserAccount.forProcess) ?? UserAccount.lookup(String(geteuid()))
        var options = SpawnOptions(executable: spec.argv[0], arguments: spec.argv, environment: environment(for: spec, home: account?.home))
        // `/` unless told: never wherever the daemon happened to be started.
        options.directory = spec.cwd ?? "/"
        if spec.user != nil, let account {
            let gid = spec.group ?? account.gid
            options.user = (account.uid, gid, [gid])
        }
        var stdio = try makeStdio(spec, terminal: true)
        // Its terminal is its user's, as login's and runc's are (the group stays devpts's):
        // root's, `screen`, `ssh`, `script` and whatever opens its terminal by name refused it.
        if spec.tty, let user = options.user, let slave = stdio.stdin, fchown(slave, user.uid, gid_t.max) != 0 {
            let number = errno
            stdio.closeAll()
            throw HoldfastError(.stdioFailed, "fchown of the terminal to uid \(user.uid): \(SystemError("fchown", errno: .init(rawValue: number)))")
        }
        options.stdin = stdio.stdin
        options.stdout = stdio.stdout
        options.stderr = stdio.stderr
        options.controllingTerminal = spec.tty
        // Its own session and process group: `kill 0` (the `trap 'kill 0' EXIT` idiom), a
        // job-control signal or a terminal hangup in the process stays inside it and never
        // reaches the supervisor, the roles or another container.
        options.newSession = true
        // Nor may a signal of it, or of what it starts, reach the supervisor (`SignalGuard`).
        options.seccompFilter = signalGuard?.program(forUID: options.user?.uid ?? geteuid())
        // And its own cgroup, which also holds what leaves that session (`setsid`).
        // A cgroup that cannot be made (cgroup.max.descendants, a hierarchy gone read-only) is
        // no reason to refuse the process: it runs without, and its process group does the job.
        var cgroup: String?
        var cgroupFailure: SystemError?
        if let cgroups {
            do {
                let created = try cgroups.create()
                cgroup = created.name
                options.cgroupProcs = created.procs
            } catch {
                cgroupFailure = error
            }
        }
        defer { if let procs = options.cgroupProcs { close(procs) } }
        let child: ChildReaper.Child
        do {
            // Its exec is awaited, never waited for on a thread of the cooperative pool: a
            // directory or binary on a hung file system holds this create alone.
            child = try await reaper.spawnAwaitingExec(options, within: startTimeout)
        } catch {
            stdio.closeAll()
            // Removed once the child that failed to start is reaped.
            if let cgroup { cgroups?.release(cgroup) }
            throw startFailure(error)
        }
        stdio.closeChildEnds()
        var started = started(pid: child.pid, child: child, id: spec.id, stdio: stdio)
        started.cgroup = cgroup
        started.cgroupFailure = cgroupFailure
        return started
    }

    /// The broker's part: no streams, no fds.
    static func started(pid: pid_t, child: ChildReaper.Child? = nil, id: String, stdio: Stdio) -> Started {
        if stdio.streams.isEmpty {
            for fd in stdio.hostEnds { _ = close(fd) }
            return Started(pid: pid, child: child, adopt: AdoptRequest(process: id, streams: []), descriptors: [])
        }
        return Started(pid: pid, child: child, adopt: AdoptRequest(process: id, streams: stdio.streams), descriptors: stdio.hostEnds)
    }
}

extension Supervisor {
    /// The check a process spec (a bridge `create`, a local `launch`) passes before anything
    /// starts. Pure apart from user look-ups, so the bridge fuzz target runs every create body
    /// it decodes through it.
    public static func validate(_ spec: ProcessSpec) throws(HoldfastError) {
        try Launcher.validate(spec)
    }

    /// The streams a spec that passed `validate` hands the broker (in its adopt request).
    public static func streamDescriptions(for spec: ProcessSpec) -> [StreamDescription] {
        Launcher.streamDescriptions(spec)
    }
}
