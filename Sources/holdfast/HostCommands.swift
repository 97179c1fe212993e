import ArgumentParser
import HoldfastConfig
import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTools

#if canImport(Glibc)
import Glibc
#endif

/// The `holdfast host` commands: their own failures exit 125 (podman's convention), never a
/// code a process could have returned by habit.
protocol HostFamilyCommand {}

/// `holdfast host ...`: the host side, for development, tests and demos.
struct Host: AsyncParsableCommand, HostFamilyCommand {
    static let configuration = CommandConfiguration(
        abstract: "The host side: accept a guest's bridge and streams, start processes in it.",
        discussion: """
            With no flags, every command uses the addresses of config/holdfast-dev.yaml under \
            $HOLDFAST_RUN_DIR (default /tmp/holdfast): run 'holdfast host serve' in one terminal, \
            'holdfast daemon --config config/holdfast-dev.yaml' (as root) in another, then \
            'holdfast host run -- CMD ARGS...'. Exit status: 125 for Holdfast's own failure (one \
            line on stderr says why), 126 when the program cannot be executed, 127 when it is not \
            found, otherwise the process's own.
            """,
        subcommands: [
            HostServe.self, HostRun.self, HostExec.self, HostAttach.self, HostWait.self, HostStop.self, HostLogs.self, HostPS.self,
            HostKill.self, HostMigrate.self,
        ])
}

struct HostServe: AsyncParsableCommand, HostFamilyCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve", abstract: "Accept the guest's bridge and stream connections; serve host run/ps/kill.")

    @Option(help: "Where the guest's bridge dials.") var bridge = HostDefaults.bridge
    @Option(help: "Where the guest's streams dial (any number of reconnections).") var streams = HostDefaults.streams
    @Option(help: "The local control socket for host run/ps/kill.") var control = HostDefaults.control
    @Option(help: ArgumentHelp(
        "The bridge key the guest must prove it holds (hex digits, mode 0600).",
        discussion: "Default: bridge.key next to the control socket (\(HostDefaults.keyFile): config/holdfast-dev.yaml's bridge.key_file), created with a new key if missing; a file named here must exist."))
    var keyFile: String?
    @Option(help: "hmac-sha256, or none: any process in the guest may pose as the guest (for a guest with bridge.authentication: none).")
    var authentication: BridgeAuthenticationMethod = .hmacSHA256
    @Option(help: "How much of each process's output to keep for 'host logs' (bytes; K, M suffixes).")
    var logSize = "1M"
    @Option(help: "How many finished processes' logs to keep.") var logsKept = HostDefaults.logsKept

    func validate() throws {
        guard parsedLogSize != nil else { throw ValidationError("--log-size '\(logSize)': expected bytes, e.g. 65536, 512K or 4M") }
        guard logsKept >= 0 else { throw ValidationError("--logs-kept must be 0 or more") }
        if authentication == .none, keyFile != nil { throw ValidationError("--key-file needs --authentication hmac-sha256") }
    }

    var parsedLogSize: Int? {
        let text = logSize.uppercased()
        let (digits, scale): (Substring, Int) =
            text.hasSuffix("K") ? (text.dropLast(), 1 << 10) : text.hasSuffix("M") ? (text.dropLast(), 1 << 20) : (Substring(text), 1)
        guard let value = Int(digits), value >= 0, value <= (1 << 30) / scale else { return nil }
        return value * scale
    }

    func run() async throws {
        Memory.returnLargeBuffersToTheSystem()
        let bridgeAddress = try parseAddress(bridge)
        let streamsAddress = try parseAddress(streams)
        // The control socket's directory (the run directory by default) is ours alone while we
        // serve: checked, locked (host.lock), and cleared only of our own stale sockets.
        let lock: RunDirectoryLock
        let directory = RunDirectory.directory(of: control.hasPrefix("/") ? control : currentDirectory() + "/" + control)
        do throws(RunDirectory.Refusal) {
            lock = try RunDirectory.claim(directory, lockName: "host.lock")
            var sockets = [control]
            for case .unix(let path) in [bridgeAddress, streamsAddress] { sockets.append(path) }
            for socket in sockets { try RunDirectory.prepareSocket(socket, runDirectory: directory) }
        } catch {
            var standardError = StandardError()
            print("holdfast host serve: refusing to start: \(error)", to: &standardError)
            throw ExitCode(2)
        }
        defer { withExtendedLifetime(lock) {} }
        // The bridge key: by default in the directory just checked (the run directory), made there
        // if missing.
        var key: BridgeKey?
        if authentication == .hmacSHA256 {
            do {
                if let keyFile {
                    key = try BridgeKeyFile.load(keyFile)
                    writeLine("holdfast host: bridge key \(keyFile)")
                } else {
                    let path = directory + "/bridge.key"
                    let (loaded, created) = try BridgeKeyFile.loadOrCreate(path)
                    key = loaded
                    writeLine("holdfast host: bridge key \(path)\(created ? " (new)" : "")")
                }
            } catch {
                throw CommandFailure("holdfast host serve: bridge key \(error)")
            }
        }
        let service = try HostService(
            bridge: bridgeAddress, bridgeKey: key, streams: streamsAddress, control: control, logSize: parsedLogSize ?? HostDefaults.logSize,
            logsKept: logsKept
        ) { writeLine($0) }
        defer { service.close() }
        let signals = try SignalPipe(signals: [SIGINT, SIGTERM])
        let serving = Task { await service.run() }
        _ = await signals.next()
        serving.cancel()
    }
}

/// What `host run`, `exec` and `attach` say in their help about how they end.
let hostExitStatusHelp = """
    Exits with the process's exit status (its code, or 128 + the signal that killed it), once its \
    output has arrived. Exits 125 when Holdfast itself cannot give it — host serve unreachable, \
    the create refused, or the process lost (the guest's daemon restarted, the guest rebooted, \
    or the process left the guest's list with no exit) — with one line on stderr saying why; \
    126 when the program cannot be executed, 127 when it is not found. The detach keys \
    (default Ctrl-P Ctrl-Q, typed on a terminal) or Ctrl-C leave the process running and print \
    how to reattach: exit 0 after the detach keys; after Ctrl-C the client ends as killed by \
    SIGINT (130), so a script stops.
    """

/// `--drain-timeout`, shared by the commands that wait for a process.
struct DrainTimeoutOption: ParsableArguments {
    @Option(
        help: ArgumentHelp(
            "After the process's exit is known, how long an output stream may go without a byte before it is ended (e.g. 500ms, 30s, 2m).",
            discussion: "The default, 30s, is the guest's streams.drain_timeout default. A stream still open then is held by something else (an orphan of the process, a broker that died with it)."))
    var drainTimeout = "30s"

    func duration() throws -> Duration {
        switch ValueParsers.positiveDuration(drainTimeout) {
        case .success(let milliseconds): return .milliseconds(milliseconds)
        case .failure(let problem): throw ValidationError("--drain-timeout '\(drainTimeout)': \(problem.reason)")
        }
    }

    func validate() throws { _ = try duration() }
}

/// `--detach-keys`, shared by the commands that wire a terminal to a process.
struct DetachKeysOption: ParsableArguments {
    @Option(
        help: ArgumentHelp(
            "The keys that detach this client from the process, leaving it running (typed on a terminal).",
            discussion: "Comma-separated, each a character or ctrl-X (a-z, @, [, \\, ], ^, _); an empty string turns detaching off."))
    var detachKeys = DetachKeys.defaultNotation

    func keys() throws -> DetachKeys {
        do {
            return try DetachKeys(parsing: detachKeys)
        } catch {
            throw ValidationError("--detach-keys '\(detachKeys)': \(error)")
        }
    }

    func validate() throws { _ = try keys() }

    /// The interaction of a terminal client: these keys, and Ctrl-C as a detach.
    func interaction() throws -> HostClient.Interaction {
        var interrupted: (@Sendable () async -> Void)?
        if let pipe = try? SignalPipe(signals: [SIGINT]) {
            interrupted = { _ = await pipe.next() }
        }
        return HostClient.Interaction(detachKeys: try keys(), interrupted: interrupted)
    }
}

/// `-e`, `-w`, `-u`: what the process runs with.
struct ProcessEnvironmentOptions: ParsableArguments {
    @Option(
        name: [.customShort("e"), .long],
        help: ArgumentHelp(
            "Set an environment variable: NAME=VALUE, or NAME to pass this client's value (repeatable).",
            discussion: "The guest adds PATH and HOME when they are not set, and TERM for a terminal (this client's TERM is passed with --tty)."))
    var env: [String] = []
    @Option(name: [.customShort("w"), .customLong("cwd"), .customLong("workdir")], help: "The working directory in the guest (default /; a runc exec: the bundle's).")
    var cwd: String?
    @Option(name: [.customShort("u"), .long], help: "The user to run as: a name or uid, with :GID (a number) if wanted; a runc exec takes UID[:GID].")
    var user: String?

    func validate() throws {
        for entry in env where entry.isEmpty || entry.hasPrefix("=") {
            throw ValidationError("-e '\(entry)': expected NAME=VALUE or NAME")
        }
        if let cwd, !cwd.hasPrefix("/") { throw ValidationError("--cwd '\(cwd)': the working directory must be an absolute path in the guest") }
        if let user, user.isEmpty { throw ValidationError("--user: name a user") }
    }

    /// NAME=VALUE entries; a bare NAME takes this client's value (left out if it has none), and
    /// a terminal gets this client's TERM unless one was given.
    func environment(tty: Bool) -> [String]? {
        var result: [String] = []
        for entry in env {
            if entry.contains("=") {
                result.append(entry)
            } else if let value = getenv(entry) {
                result.append(entry + "=" + String(cString: value))
            }
        }
        if tty, !result.contains(where: { $0.hasPrefix("TERM=") }), let term = getenv("TERM") {
            result.append("TERM=" + String(cString: term))
        }
        return result.isEmpty ? nil : result
    }

    /// (user, group) for a direct process: `name[:gid]`.
    func directUser() throws -> (String?, UInt32?) {
        guard let user else { return (nil, nil) }
        let parts = user.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2 else { return (user, nil) }
        guard !parts[0].isEmpty, let group = UInt32(parts[1]) else {
            throw ValidationError("--user '\(user)': expected NAME or UID, with :GID (a number)")
        }
        return (String(parts[0]), group)
    }
}

/// A command captured after the options: options are this command's only before the first word
/// (or `--`); after it everything belongs to the command. Returns the argv, or nil if the first
/// word is an option this command does not know.
func commandAfterOptions(_ captured: [String]) throws -> [String] {
    if captured.first == "--" { return Array(captured.dropFirst()) }
    if let first = captured.first, first.hasPrefix("-"), first != "-" {
        throw ValidationError("unknown option '\(first)' (options go before the command; put '--' before a command that starts with '-')")
    }
    return captured
}

/// Ends `host run/exec/attach`: the process's status, or 125 (126, 127) with the reason on
/// stderr; after a detach, how to reattach.
func finishHostCommand(
    _ name: String, drainTimeout: String, _ body: () async throws(HoldfastError) -> HostRunOutcome
) async throws -> Never {
    let outcome: HostRunOutcome
    do {
        outcome = try await body()
    } catch {
        writeError("holdfast \(name): \(error)")
        throw ExitCode(HostExitCode.status(for: error))
    }
    switch outcome {
    case .exited(let report, let endedByHost):
        if !endedByHost.isEmpty {
            writeError(
                "holdfast \(name): \(endedByHost.joined(separator: " and ")) had no end from the guest within the drain timeout "
                    + "(\(drainTimeout)) after the exit (held open by another process, or lost with the broker): ended here")
        }
        if report.outputCutShort == true {
            writeError(
                "holdfast \(name): the process's output was cut short in the guest (its daemon stopping, or its broker dying): "
                    + "at least \(report.undelivered) bytes not delivered")
        } else if report.undelivered > 0 {
            writeError("holdfast \(name): \(report.undelivered) bytes of output were not delivered")
        }
        if let lost = report.lost, lost > 0 {
            writeError(
                "holdfast \(name): the guest's broker crashed while it held \(lost) bytes of this process's streams: they are lost "
                    + "(the offsets are in host serve's log and the daemon's)")
        }
        throw ExitCode(report.exitCode)
    case .lost(let loss, _):
        writeError("holdfast \(name): lost: \(loss.message)")
        throw ExitCode(HostExitCode.holdfastFailure)
    case .detached(let id, let cause):
        // On a line of its own: a terminal in raw mode may have left the cursor mid-line.
        writeError("\r\ndetached; reattach with: holdfast host attach \(id)")
        switch cause {
        case .detachKeys:
            throw ExitCode.success
        case .interrupt:
            // Die of SIGINT, as a shell expects of an interrupted command (a script stops).
            // (This thread may block it, as the concurrency pool's threads do: unblocked here.)
            signal(SIGINT, SIG_DFL)
            var interrupt = sigset_t()
            sigemptyset(&interrupt)
            sigaddset(&interrupt, SIGINT)
            pthread_sigmask(SIG_UNBLOCK, &interrupt, nil)
            raise(SIGINT)
            throw ExitCode(128 + SIGINT)
        }
    }
}

/// Says, on stderr, what a command waits for if the wait is long; cancel it when done.
func sayIfSlow(after delay: Duration = .seconds(1), _ text: String) -> Task<Void, Never> {
    Task {
        try? await Task.sleep(for: delay)
        if !Task.isCancelled { writeError(text) }
    }
}

/// Before a create: if no guest is connected to host serve's bridge, says so (the create waits
/// for one, bounded).
func announceGuestWait(_ name: String, control: String) async {
    guard let stats = try? await HostClient.stats(control: control), stats.guestConnected == false else { return }
    writeError(
        "holdfast \(name): no guest is connected to host serve's bridge (\(stats.bridgeAddress ?? "?")) yet: waiting up to "
            + "\(HostDefaults.guestWait.spoken) for 'holdfast daemon' to connect")
}

struct HostRun: AsyncParsableCommand, HostFamilyCommand {
    static let configuration = CommandConfiguration(
        commandName: "run", abstract: "Start a process in the guest, wire this terminal to it, exit with its exit code.",
        usage: "holdfast host run [OPTIONS] [--] CMD [ARGS...]   (a runc container: --runtime runc --bundle PATH, no CMD)",
        discussion: hostExitStatusHelp)

    @Flag(name: .shortAndLong, help: "Give the process a terminal (this terminal goes raw while it runs).") var tty = false
    @Flag(name: .shortAndLong, help: "Keep stdin open for a later 'host attach' when detached (-d); in the foreground stdin is always wired.")
    var interactive = false
    @Flag(name: .shortAndLong, help: "Start it and print its id: no client; its output goes to its log ('host logs ID'), 'host attach ID' takes it up.")
    var detach = false
    @OptionGroup var environment: ProcessEnvironmentOptions
    @Option(
        help: """
            Stream mode: resumable (exactly once; authenticated: only the guest's broker, holding the \\
            stream's secret, can connect for it) or raw (plain bytes to any listener named with \\
            --stdin/--stdout/--stderr: unauthenticated, anything that can reach that listener can \\
            write into it, and bytes in flight when a connection drops are lost).
            """)
    var mode: StreamModeName = .resumable
    @Option(help: "The process id (default: a random one).") var id: String?
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @Option(help: "Raw mode: where the guest sends stdin's connection (any listener).") var stdin: String?
    @Option(help: "Raw mode: where the guest sends stdout (any listener, e.g. socat).") var stdout: String?
    @Option(help: "Raw mode: where the guest sends stderr.") var stderr: String?
    @Option(help: "direct (fork+exec the command) or runc (an OCI container from --bundle).") var runtime: RuntimeName = .direct
    @Option(help: "runc: the OCI bundle directory in the guest (config.json and rootfs); its config names the program.")
    var bundle: String?
    @OptionGroup var drain: DrainTimeoutOption
    @OptionGroup var keys: DetachKeysOption
    @Argument(parsing: .captureForPassthrough, help: "The command and its arguments (options before it are holdfast's, everything after it the command's).")
    var command: [String] = []

    func validate() throws {
        // The command is captured for passthrough, options it does not know included: a help
        // request before any command is still ours.
        if let first = command.first, first == "--help" || first == "-h" { throw CleanExit.helpRequest(self) }
        let argv = try commandAfterOptions(command)
        switch runtime {
        case .direct:
            guard bundle == nil else { throw ValidationError("--bundle needs --runtime runc") }
            guard !argv.isEmpty else { throw ValidationError("name a command: holdfast host run [OPTIONS] -- CMD ARGS...") }
        case .runc:
            guard let bundle, bundle.hasPrefix("/") else {
                throw ValidationError("--runtime runc needs --bundle with the bundle's absolute path in the guest")
            }
            guard argv.isEmpty else {
                throw ValidationError("a runc container runs what its bundle's config.json names; to run a command in it: holdfast host exec ID -- CMD")
            }
            guard environment.env.isEmpty, environment.cwd == nil, environment.user == nil else {
                throw ValidationError("-e, --cwd and --user of a runc container come from its bundle's config.json (host exec takes them)")
            }
        }
        for (kind, address) in [("stdin", stdin), ("stdout", stdout), ("stderr", stderr)] {
            guard let address else { continue }
            guard mode == .raw else { throw ValidationError("--\(kind) names a listener for raw mode: add --mode raw") }
            _ = try parseAddress(address)
        }
        if detach, mode == .raw { throw ValidationError("--detach keeps the output in host serve's log: it needs --mode resumable") }
        if interactive, !detach, mode == .raw { throw ValidationError("-i is for --detach") }
    }

    func run() async throws {
        let argv = try commandAfterOptions(command)
        let drainTimeout = try drain.duration()
        var raw: [String: String] = [:]
        for (kind, address) in [("stdin", stdin), ("stdout", stdout), ("stderr", stderr)] {
            if let address { raw[kind] = address }
        }
        var size: WindowSize?
        if tty { size = try? Terminal.size(of: 0) }
        let (user, group) = try environment.directUser()
        let request = HostRunRequest(
            id: id, argv: argv, tty: tty, mode: mode, rows: size?.rows, columns: size?.columns, env: environment.environment(tty: tty),
            cwd: environment.cwd, rawAddresses: raw.isEmpty ? nil : raw, runtime: runtime == .direct ? nil : runtime, bundle: bundle,
            user: user, group: group, interactive: interactive ? true : nil)
        await announceGuestWait("host run", control: control)
        if detach {
            do {
                print(try await HostClient.start(control: control, request: request).id)
            } catch {
                writeError("holdfast host run: \(error)")
                throw ExitCode(HostExitCode.status(for: error))
            }
            return
        }
        let interaction = try keys.interaction()
        try await finishHostCommand("host run", drainTimeout: drain.drainTimeout) { () throws(HoldfastError) in
            try await HostClient.run(control: control, request: request, drainTimeout: drainTimeout, interaction: interaction)
        }
    }
}

struct HostExec: AsyncParsableCommand, HostFamilyCommand {
    static let configuration = CommandConfiguration(
        commandName: "exec",
        abstract: "Run a command inside a running runc container (runc exec) with its own streams; exit with its exit code.",
        usage: "holdfast host exec [OPTIONS] CONTAINER [--] CMD [ARGS...]",
        discussion: hostExitStatusHelp)

    @Flag(name: .shortAndLong, help: "Give the command a terminal (this terminal goes raw while it runs).") var tty = false
    @Flag(name: .shortAndLong, help: "Keep stdin open for a later 'host attach' when detached (-d).") var interactive = false
    @Flag(name: .shortAndLong, help: "Start it and print its id (see 'host run --detach').") var detach = false
    @OptionGroup var environment: ProcessEnvironmentOptions
    @Option(help: "The exec's process id (default: CONTAINER.execN).") var id: String?
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @OptionGroup var drain: DrainTimeoutOption
    @OptionGroup var keys: DetachKeysOption
    @Argument(help: "The container: the id its 'host run --runtime runc' gave it.") var container: String
    @Argument(parsing: .captureForPassthrough, help: "The command and its arguments.") var command: [String] = []

    func validate() throws {
        if container == "--help" || container == "-h" { throw CleanExit.helpRequest(self) }
        if let first = command.first, first == "--help" || first == "-h" { throw CleanExit.helpRequest(self) }
        if container.hasPrefix("-") { throw ValidationError("unknown option '\(container)' (options go before the container)") }
        guard !(try commandAfterOptions(command)).isEmpty else {
            throw ValidationError("name a command: holdfast host exec CONTAINER -- CMD ARGS...")
        }
        if let user = environment.user {
            let parts = user.split(separator: ":", omittingEmptySubsequences: false)
            guard (1...2).contains(parts.count), parts.allSatisfy({ UInt32($0) != nil }) else {
                throw ValidationError("--user '\(user)': an exec takes UID[:GID] (numbers inside the container)")
            }
        }
    }

    func run() async throws {
        let argv = try commandAfterOptions(command)
        let drainTimeout = try drain.duration()
        var size: WindowSize?
        if tty { size = try? Terminal.size(of: 0) }
        let request = HostRunRequest(
            id: id, argv: argv, tty: tty, rows: size?.rows, columns: size?.columns, env: environment.environment(tty: tty),
            cwd: environment.cwd, runtime: .runc, container: container, user: environment.user, interactive: interactive ? true : nil)
        await announceGuestWait("host exec", control: control)
        if detach {
            do {
                print(try await HostClient.start(control: control, request: request).id)
            } catch {
                writeError("holdfast host exec: \(error)")
                throw ExitCode(HostExitCode.status(for: error))
            }
            return
        }
        let interaction = try keys.interaction()
        try await finishHostCommand("host exec", drainTimeout: drain.drainTimeout) { () throws(HoldfastError) in
            try await HostClient.run(control: control, request: request, drainTimeout: drainTimeout, interaction: interaction)
        }
    }
}

struct HostAttach: AsyncParsableCommand, HostFamilyCommand {
    static let configuration = CommandConfiguration(
        commandName: "attach",
        abstract: "Wire this terminal to a process started with 'host run' again (its stdin too); exit with its exit code.",
        discussion: "A process with a terminal makes this one raw (host serve says so; --tty forces it). " + hostExitStatusHelp)
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @Flag(name: .shortAndLong, help: "Make this terminal raw even if host serve does not say the process has a terminal.") var tty = false
    @OptionGroup var drain: DrainTimeoutOption
    @OptionGroup var keys: DetachKeysOption
    @Argument(help: "The process id.") var id: String

    func run() async throws {
        let drainTimeout = try drain.duration()
        let interaction = try keys.interaction()
        try await finishHostCommand("host attach", drainTimeout: drain.drainTimeout) { () throws(HoldfastError) in
            try await HostClient.attach(control: control, id: id, tty: tty, drainTimeout: drainTimeout, interaction: interaction)
        }
    }
}

struct HostWait: AsyncParsableCommand, HostFamilyCommand {
    static let configuration = CommandConfiguration(
        commandName: "wait",
        abstract: "Wait for processes to end and print each one's exit status.",
        discussion: """
            Prints one line per process: its exit status (its code, or 128 + the signal that killed it). \\
            Does not wait for anyone to read its output (host logs has it). Exits 0 once every process \\
            ended; 125 if a process is unknown to host serve or lost (its exit will never be known).
            """)
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @Argument(help: "The process ids.") var ids: [String]

    func validate() throws {
        guard !ids.isEmpty else { throw ValidationError("name a process: holdfast host wait ID...") }
    }

    func run() async throws {
        var failed = false
        for id in ids {
            do {
                let outcome = try await HostClient.waitForExit(control: control, id: id)
                if let exit = outcome.exit {
                    print(exit.exitCode)
                } else {
                    writeError("holdfast host wait: \(id): lost: \(outcome.lost?.message ?? "no outcome")")
                    failed = true
                }
            } catch {
                writeError("holdfast host wait: \(id): \(error)")
                failed = true
            }
        }
        if failed { throw ExitCode(HostExitCode.holdfastFailure) }
    }
}

struct HostStop: AsyncParsableCommand, HostFamilyCommand {
    static let configuration = CommandConfiguration(
        commandName: "stop",
        abstract: "Stop processes: a signal (default SIGTERM), then SIGKILL if one has not exited after --time seconds.",
        discussion: """
            Prints each id once it has ended. A container's pid 1 ignores a signal it has no \\
            handler for (SIGTERM included): --time bounds that wait. Exits 125 if a process is \\
            unknown to host serve or its end could not be seen.
            """)
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @Option(name: [.customShort("t"), .long], help: "Seconds to wait after the signal before SIGKILL.") var time = 10
    @Option(name: [.customShort("s"), .long], help: "The first signal: a name or a number.") var signal = "TERM"
    @Argument(help: "The process ids.") var ids: [String]

    func validate() throws {
        guard !ids.isEmpty else { throw ValidationError("name a process: holdfast host stop [--time N] ID...") }
        guard (0...3600).contains(time) else { throw ValidationError("--time must be 0 to 3600 seconds") }
        _ = try parseSignal(signal)
    }

    func run() async throws {
        let number = try parseSignal(signal)
        var failed = false
        for id in ids {
            let notice = sayIfSlow(
                "holdfast host stop: waiting up to \(time)s for \(id) to exit after \(SignalNames.name(number)), then SIGKILL")
            defer { notice.cancel() }
            do {
                let stopped = try await HostClient.stop(control: control, id: id, signal: number, timeout: .seconds(time))
                notice.cancel()
                if stopped.killed {
                    writeError("holdfast host stop: \(id) did not exit within \(time)s of \(SignalNames.name(number)): killed with SIGKILL")
                }
                if let lost = stopped.outcome.lost {
                    writeError("holdfast host stop: \(id): lost: \(lost.message)")
                    failed = true
                } else {
                    print(id)
                }
            } catch {
                notice.cancel()
                writeError("holdfast host stop: \(id): \(error)")
                failed = true
            }
        }
        if failed { throw ExitCode(HostExitCode.holdfastFailure) }
    }
}

struct HostLogs: AsyncParsableCommand, HostFamilyCommand {
    static let configuration = CommandConfiguration(
        commandName: "logs",
        abstract: "Print what host serve kept of a process's output (stdout here, stderr on stderr), running or finished.",
        discussion: """
            host serve keeps the last --log-size bytes (default 1 MiB) of each process's output, and \\
            the logs of the last --logs-kept finished processes (see 'host serve --help').
            """)
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @Flag(name: .shortAndLong, help: "Go on printing what comes next until the process's output ends.") var follow = false
    @Argument(help: "The process id.") var id: String

    func run() async throws {
        do {
            try await HostClient.logs(control: control, id: id, follow: follow)
        } catch {
            writeError("holdfast host logs: \(error)")
            throw ExitCode(HostExitCode.holdfastFailure)
        }
    }
}

struct HostPS: AsyncParsableCommand, HostFamilyCommand {
    static let configuration = CommandConfiguration(commandName: "ps", abstract: "List the guest's processes (-a: with those that ended).")
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @Flag(name: .shortAndLong, help: "Also the processes that ended, with their exit status (host serve remembers the last 1,024).")
    var all = false
    @Flag(help: "Print JSON.") var json = false

    func run() async throws {
        let list: HostProcessList
        do {
            list = try await HostClient.processes(control: control, all: all)
        } catch {
            writeError("holdfast host ps: \(error)")
            throw ExitCode(HostExitCode.holdfastFailure)
        }
        if !list.guestAnswered {
            writeError("holdfast host ps: the guest is not connected to host serve: this is what host serve knows")
        }
        print(json ? String(decoding: ControlJSON.encode(list), as: UTF8.self) : HostClient.render(list))
    }
}

struct HostKill: AsyncParsableCommand, HostFamilyCommand {
    static let configuration = CommandConfiguration(commandName: "kill", abstract: "Signal a process in the guest.")
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @Argument(help: "The process id.") var id: String
    @Argument(help: "The signal: a name (TERM, SIGKILL, RTMIN+1...) or a number from 1 to 64.") var signal = "TERM"

    func validate() throws { _ = try parseSignal(signal) }

    func run() async throws {
        let number = try parseSignal(signal)
        do {
            try await HostClient.signal(control: control, id: id, signal: number)
        } catch {
            writeError("holdfast host kill: \(error)")
            throw ExitCode(HostExitCode.holdfastFailure)
        }
    }
}

struct HostMigrate: AsyncParsableCommand, HostFamilyCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate", abstract: "Drop the bridge and every stream connection and refuse new ones for a while, as a live migration does.")
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @Option(help: "How long nothing is accepted, in milliseconds.") var blackout = 500

    func validate() throws {
        guard (0...600_000).contains(blackout) else { throw ValidationError("--blackout must be 0 to 600000 ms") }
    }

    func run() async throws {
        let result: HostMigrateResponse
        do {
            result = try await HostClient.migrate(control: control, blackout: .milliseconds(blackout))
        } catch {
            writeError("holdfast host migrate: \(error)")
            throw ExitCode(HostExitCode.holdfastFailure)
        }
        let blackout = Duration.milliseconds(result.blackoutMilliseconds).spoken
        guard result.bridgeDropped else {
            print("migrated: no guest was connected; \(result.streamConnectionsDropped) stream connections dropped, nothing accepted for \(blackout)")
            return
        }
        var line = "migrated: dropped the bridge and \(result.streamConnectionsDropped) stream connection"
            + "\(result.streamConnectionsDropped == 1 ? "" : "s"), accepted nothing for \(blackout); "
        if let back = result.guestBackAfterMilliseconds {
            line += "the guest was back \(Duration.milliseconds(back).spoken) after"
        } else {
            line += "the guest was not back within \(HostMigrateResponse.reconnectWait.spoken) after (it redials with back-off: see 'host ps', 'holdfast status')"
        }
        print(line)
    }
}

/// A signal named on the command line, or a usage error listing the valid names.
func parseSignal(_ text: String) throws -> Int32 {
    guard let number = SignalNames.number(text) else {
        throw ValidationError("unknown signal '\(text)': valid are \(SignalNames.validNames)")
    }
    return number
}

extension StreamModeName: ExpressibleByArgument {}
extension RuntimeName: ExpressibleByArgument {}
extension BridgeAuthenticationMethod: ExpressibleByArgument {}

func currentDirectory() -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    guard getcwd(&buffer, buffer.count) != nil else { return "." }
    return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// One line to stdout, unbuffered: a log read while the service runs must be current.
func writeLine(_ text: String) {
    var line = Array((text + "\n").utf8)
    var offset = 0
    while offset < line.count {
        let count = line[offset...].withUnsafeBytes { Glibc.write(1, $0.baseAddress, $0.count) }
        if count <= 0 { return }
        offset += count
    }
    line.removeAll()
}

/// One line to stderr, unbuffered.
func writeError(_ text: String) {
    let line = Array((text + "\n").utf8)
    var offset = 0
    while offset < line.count {
        let count = line[offset...].withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
        if count <= 0 { return }
        offset += count
    }
}
