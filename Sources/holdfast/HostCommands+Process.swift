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

// `host run`, `exec`, `attach`, `wait`, `stop`: the commands that follow one process.

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
    @Option(name: [.customLong("id"), .customLong("name")], help: "The process id (default: a random one); --name is podman's word for it.")
    var id: String?
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
        // Its signals are handled from before the wait is announced: a Ctrl-C right after the
        // "waiting for a guest" line (before, it could come before the handler, and killed the
        // client without a word).
        let interaction = detach ? nil : try keys.interaction()
        await announceGuestWait("host run", control: control)
        if detach {
            do {
                print(try await HostClient.start(control: control, request: request).id)
            } catch {
                writeError("holdfast host run: \(guestText(error))")
                throw ExitCode(HostExitCode.status(for: error))
            }
            return
        }
        guard let interaction else { return }
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
    @Option(name: [.customLong("id"), .customLong("name")], help: "The exec's process id (default: CONTAINER.execN); --name as for run.")
    var id: String?
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
        // Its signals are handled from before the wait is announced: a Ctrl-C right after the
        // "waiting for a guest" line (before, it could come before the handler, and killed the
        // client without a word).
        let interaction = detach ? nil : try keys.interaction()
        await announceGuestWait("host exec", control: control)
        if detach {
            do {
                print(try await HostClient.start(control: control, request: request).id)
            } catch {
                writeError("holdfast host exec: \(guestText(error))")
                throw ExitCode(HostExitCode.status(for: error))
            }
            return
        }
        guard let interaction else { return }
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
                    writeError("holdfast host wait: \(id): lost: \(guestText(outcome.lost?.message ?? "no outcome"))")
                    failed = true
                }
            } catch {
                writeError("holdfast host wait: \(id): \(guestText(error))")
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
            Stops every process named at once; prints each id once it has ended. A container's pid 1 ignores a signal it has no \\
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
        let (control, time) = (control, time)
        // All at once, as podman and docker stop them: three that ignore the signal take --time
        // once, not three times, and the last is not signalled 20 s after the first.
        let failures = await withTaskGroup(of: Bool.self) { group in
            for id in ids {
                group.addTask { await Self.stop(id, signal: number, time: time, control: control) }
            }
            var failures = 0
            for await stopped in group where !stopped { failures += 1 }
            return failures
        }
        if failures > 0 { throw ExitCode(HostExitCode.holdfastFailure) }
    }

    /// Stops `id`, printing it once it ended (or why not on stderr); false if it could not be.
    static func stop(_ id: String, signal number: Int32, time: Int, control: String) async -> Bool {
        let notice = sayIfSlow("holdfast host stop: waiting up to \(time)s for \(id) to exit after \(SignalNames.name(number)), then SIGKILL")
        defer { notice.cancel() }
        do {
            let stopped = try await HostClient.stop(control: control, id: id, signal: number, timeout: .seconds(time))
            notice.cancel()
            if stopped.killed {
                writeError("holdfast host stop: \(id) did not exit within \(time)s of \(SignalNames.name(number)): killed with SIGKILL")
            }
            if let lost = stopped.outcome.lost {
                writeError("holdfast host stop: \(id): lost: \(guestText(lost.message))")
                return false
            }
            print(id)
            return true
        } catch {
            notice.cancel()
            writeError("holdfast host stop: \(id): \(guestText(error))")
            return false
        }
    }
}
