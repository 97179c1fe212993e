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

/// `holdfast host ...`: the host side, for development, tests and demos.
struct Host: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The host side: accept a guest's bridge and streams, start processes in it.",
        discussion: """
            With no flags, every command uses the addresses of config/holdfast-dev.yaml under \
            $HOLDFAST_RUN_DIR (default /tmp/holdfast): run 'holdfast host serve' in one terminal, \
            'holdfast daemon --config config/holdfast-dev.yaml' (as root) in another, then \
            'holdfast host run -- CMD ARGS...'.
            """,
        subcommands: [HostServe.self, HostRun.self, HostExec.self, HostAttach.self, HostPS.self, HostKill.self, HostMigrate.self])
}

struct HostServe: AsyncParsableCommand {
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

    func run() async throws {
        if authentication == .none, keyFile != nil { throw ValidationError("--key-file needs --authentication hmac-sha256") }
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
        let service = try HostService(bridge: bridgeAddress, bridgeKey: key, streams: streamsAddress, control: control) { writeLine($0) }
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
    or the process left the guest's list with no exit) — with one line on stderr saying why.
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
}

/// Ends `host run/exec/attach`: the process's status, or 125 with the reason on stderr.
func finishHostCommand(
    _ name: String, drainTimeout: String, _ body: () async throws(HoldfastError) -> HostRunOutcome
) async throws -> Never {
    let outcome: HostRunOutcome
    do {
        outcome = try await body()
    } catch {
        writeError("holdfast \(name): \(error)")
        throw ExitCode(HostExitCode.holdfastFailure)
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
        throw ExitCode(report.exitCode)
    case .lost(let loss, _):
        writeError("holdfast \(name): lost: \(loss.message)")
        throw ExitCode(HostExitCode.holdfastFailure)
    }
}

struct HostRun: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run", abstract: "Start a process in the guest, wire this terminal to it, exit with its exit code.",
        discussion: hostExitStatusHelp)

    @Flag(help: "Give the process a terminal (this terminal goes raw while it runs).") var tty = false
    @Option(
        help: """
            Stream mode: resumable (exactly once; authenticated: only the guest's broker, holding the \
            stream's secret, can connect for it) or raw (plain bytes to any listener named with \
            --stdin/--stdout/--stderr: unauthenticated, anything that can reach that listener can \
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
    @Argument(parsing: .captureForPassthrough, help: "The command and its arguments (after --).") var command: [String] = []

    func run() async throws {
        // The command is captured for passthrough, options it does not know included: a help
        // request before any command is still ours.
        if let first = command.first, first == "--help" || first == "-h" { throw CleanExit.helpRequest(self) }
        let argv = command.first == "--" ? Array(command.dropFirst()) : command
        let drainTimeout = try drain.duration()
        switch runtime {
        case .direct:
            guard !argv.isEmpty else { throw ValidationError("name a command: holdfast host run -- CMD ARGS...") }
            guard bundle == nil else { throw ValidationError("--bundle needs --runtime runc") }
        case .runc:
            guard let bundle, bundle.hasPrefix("/") else {
                throw ValidationError("--runtime runc needs --bundle with the bundle's absolute path in the guest")
            }
            guard argv.isEmpty else {
                throw ValidationError("a runc container runs what its bundle's config.json names; to run a command in it: holdfast host exec ID -- CMD")
            }
        }
        var raw: [String: String] = [:]
        for (kind, address) in [("stdin", stdin), ("stdout", stdout), ("stderr", stderr)] {
            guard let address else { continue }
            guard mode == .raw else { throw ValidationError("--\(kind) names a listener for raw mode: add --mode raw") }
            _ = try parseAddress(address)
            raw[kind] = address
        }
        var size: WindowSize?
        if tty { size = try? Terminal.size(of: 0) }
        let request = HostRunRequest(
            id: id, argv: argv, tty: tty, mode: mode, rows: size?.rows, columns: size?.columns,
            rawAddresses: raw.isEmpty ? nil : raw, runtime: runtime == .direct ? nil : runtime, bundle: bundle)
        try await finishHostCommand("host run", drainTimeout: drain.drainTimeout) { () throws(HoldfastError) in
            try await HostClient.run(control: control, request: request, drainTimeout: drainTimeout)
        }
    }
}

struct HostExec: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exec",
        abstract: "Run a command inside a running runc container (runc exec) with its own streams; exit with its exit code.",
        discussion: hostExitStatusHelp)

    @Flag(help: "Give the command a terminal (this terminal goes raw while it runs).") var tty = false
    @Option(help: "The exec's process id (default: CONTAINER.execN).") var id: String?
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @OptionGroup var drain: DrainTimeoutOption
    @Argument(help: "The container: the id its 'host run --runtime runc' gave it.") var container: String
    @Argument(parsing: .captureForPassthrough, help: "The command and its arguments (after --).") var command: [String] = []

    func run() async throws {
        // The command is captured for passthrough, options it does not know included: a help
        // request before any command is still ours.
        if let first = command.first, first == "--help" || first == "-h" { throw CleanExit.helpRequest(self) }
        let argv = command.first == "--" ? Array(command.dropFirst()) : command
        guard !argv.isEmpty else { throw ValidationError("name a command: holdfast host exec CONTAINER -- CMD ARGS...") }
        let drainTimeout = try drain.duration()
        var size: WindowSize?
        if tty { size = try? Terminal.size(of: 0) }
        let request = HostRunRequest(id: id, argv: argv, tty: tty, rows: size?.rows, columns: size?.columns, runtime: .runc, container: container)
        try await finishHostCommand("host exec", drainTimeout: drain.drainTimeout) { () throws(HoldfastError) in
            try await HostClient.run(control: control, request: request, drainTimeout: drainTimeout)
        }
    }
}

struct HostAttach: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "attach", abstract: "Wire this terminal to a process started with 'host run' again; exit with its exit code.",
        discussion: hostExitStatusHelp)
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @Flag(help: "The process has a terminal (this one goes raw).") var tty = false
    @OptionGroup var drain: DrainTimeoutOption
    @Argument(help: "The process id.") var id: String

    func run() async throws {
        let drainTimeout = try drain.duration()
        try await finishHostCommand("host attach", drainTimeout: drain.drainTimeout) { () throws(HoldfastError) in
            try await HostClient.attach(control: control, id: id, tty: tty, drainTimeout: drainTimeout)
        }
    }
}

struct HostPS: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ps", abstract: "List the guest's processes.")
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @Flag(help: "Print JSON.") var json = false

    func run() async throws {
        let list = try await HostClient.list(control: control)
        print(json ? String(decoding: ControlJSON.encode(list), as: UTF8.self) : HostClient.render(list))
    }
}

struct HostKill: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "kill", abstract: "Signal a process in the guest.")
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @Argument(help: "The process id.") var id: String
    @Argument(help: "The signal: a number or a name (TERM, SIGKILL...).") var signal = "TERM"

    func run() async throws {
        guard let number = signalNumber(signal) else { throw ValidationError("unknown signal '\(signal)'") }
        try await HostClient.signal(control: control, id: id, signal: number)
    }
}

struct HostMigrate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate", abstract: "Drop the bridge and every stream connection and refuse new ones for a while, as a live migration does.")
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @Option(help: "How long nothing is accepted, in milliseconds.") var blackout = 500

    func run() async throws {
        try await HostClient.migrate(control: control, blackout: .milliseconds(blackout))
    }
}

func signalNumber(_ text: String) -> Int32? {
    if let number = Int32(text) { return number }
    let name = text.uppercased().hasPrefix("SIG") ? String(text.uppercased().dropFirst(3)) : text.uppercased()
    let names: [String: Int32] = ["HUP": SIGHUP, "INT": SIGINT, "QUIT": SIGQUIT, "KILL": SIGKILL, "TERM": SIGTERM, "USR1": SIGUSR1, "USR2": SIGUSR2, "STOP": SIGSTOP, "CONT": SIGCONT, "WINCH": SIGWINCH]
    return names[name]
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
