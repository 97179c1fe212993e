import ArgumentParser
import HoldfastBridge
import HoldfastBroker
import HoldfastConfig
import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastSupervisor
import HoldfastLogging
import HoldfastTools
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// The entry point: the main thread becomes the spawn thread (`SpawnThread`) and the command
/// runs as a task. Every child is forked on that thread, and the kernel reparents orphans to it
/// (the group's first live thread), so it is the thread that can let go of a child that makes
/// its parent its tracer. Under an async `main` it would sit in libdispatch's `sigsuspend` for
/// good instead.
///
/// It is also a thread that takes the process's signals, so it unblocks all of them but the
/// ones a live upgrade blocks across its exec: those stay as they came until the new image has
/// taken over (`Supervisor.signalsBlockedAcrossExec`). Not the only one: the pool's threads
/// block them, but the first libdispatch thread, started from here, has this thread's mask (a
/// live upgrade holds the stops through the handler: `SignalPipe.holdOnThisThread`).
@main
enum HoldfastMain {
    static func main() {
        // The daemon and its roles only: a command a user runs with its stdout closed should
        // fail on it (EBADF), not write into /dev/null and say all went well.
        if let command = CommandLine.arguments.dropFirst().first, ["daemon", "broker", "bridge"].contains(command) {
            ProcessImage.fillClosedStandardDescriptors()
        }
        ProcessImage.unblockAll(except: Supervisor.signalsBlockedAcrossExec)
        SpawnThread.serveOnThisThread { await Holdfast.main() }
    }
}

struct Holdfast: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "holdfast",
        abstract: "Container stdio that survives the host connection dropping.",
        discussion: """
            Holdfast runs in a Linux utility VM, supervises container processes and carries their \
            stdin, stdout and stderr to the host over connections that may drop and come back \
            (VM live migration, host agent restart) without losing a byte.
            """,
        version: HoldfastVersion.string,
        subcommands: [
            Daemon.self, Status.self, Upgrade.self, ConfigCommand.self, Host.self, Demo.self, Pipe.self, Receive.self,
            BrokerRoleCommand.self, BridgeRoleCommand.self, SeccompProbeCommand.self, ReachProbeCommand.self,
        ])

    /// ArgumentParser's main, with two changes: an error a command throws while running is
    /// reported with that command's usage line (not the top level's), and the `host` commands
    /// exit 125 for any failure of their own, usage errors included (podman's convention: a
    /// process's 1 or 64 is never mistaken for Holdfast's).
    static func main() async {
        let arguments = Array(CommandLine.arguments.dropFirst())
        let hostFamily = arguments.first == "host"
        // A line as soon as it is printed, into a pipe too: `host wait a b | head -1` got its
        // first line only when the last process ended (stdio buffers a pipe fully).
        if hostFamily { ProcessImage.lineBufferStandardOutput() }
        var command: any ParsableCommand
        do {
            command = try parseAsRoot(arguments)
        } catch {
            let code = exitCode(for: error)
            let message = fullMessage(for: error)
            if code == .success {
                print(message)
            } else if !message.isEmpty {
                writeError(message)
            }
            Foundationless.exit(code == .success || !hostFamily ? code.rawValue : HostExitCode.holdfastFailure)
        }
        let usage = usageString(for: type(of: command))
        do {
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let exit as ExitCode {
            Foundationless.exit(exit.rawValue)
        } catch let error as ValidationError {
            writeError("Error: \(error.message)\nUsage: \(usage)\n  See '\(commandPath(arguments, for: type(of: command))) --help' for more information.")
            Foundationless.exit(command is any HostFamilyCommand ? HostExitCode.holdfastFailure : ExitCode.validationFailure.rawValue)
        } catch let failure as CommandFailure {
            writeError("Error: \(failure.description)")
            Foundationless.exit(command is any HostFamilyCommand ? HostExitCode.holdfastFailure : 1)
        } catch {
            let code = exitCode(for: error)
            let message = fullMessage(for: error)
            if code == .success {
                print(message)
                Foundationless.exit(0)
            }
            if !message.isEmpty { writeError(message) }
            Foundationless.exit(command is any HostFamilyCommand ? HostExitCode.holdfastFailure : code.rawValue)
        }
        Foundationless.exit(0)
    }

    /// "holdfast host run" for HostRun: the words of the command line up to its name.
    static func commandPath(_ arguments: [String], for type: any ParsableCommand.Type) -> String {
        let name = type._commandName
        guard let index = arguments.firstIndex(of: name) else { return "holdfast" }
        return (["holdfast"] + arguments[...index]).joined(separator: " ")
    }
}

/// exit(3) without Foundation.
enum Foundationless {
    static func exit(_ code: Int32) -> Never {
        DaemonLogHandler.flush()
        Glibc.exit(code)
    }
}

/// The logger of a role: journald priority prefixes under systemd, plain text otherwise, and the
/// role and pid as metadata on every line.
func makeLogger(_ label: String, role: String) -> Logger {
    DaemonLogHandler.bootstrap()
    var logger = Logger(label: label)
    logger[metadataKey: "role"] = "\(role)"
    logger[metadataKey: "pid"] = "\(getpid())"
    return logger
}

struct Daemon: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the Holdfast daemon: the supervisor, which starts the broker and the bridge worker.")

    @Option(help: "The configuration file (YAML or JSON); every key is described in /etc/holdfast/holdfast.yaml (config/holdfast.yaml in the source).")
    var config: String

    /// A live upgrade: the previous binary of this process left its state in this memfd.
    @Option(help: .hidden) var resumeFrom: Int32?

    /// A live upgrade's check of this binary: read the state in this memfd, say whether it can
    /// take over, start nothing.
    @Option(help: .hidden) var checkResumeSnapshot: Int32?
    /// A live upgrade fell back: this image is the previous binary again; a memfd says why.
    @Option(help: .hidden) var upgradeFellBack: Int32?

    func run() async throws {
        let code = await DaemonCommand.run(
            configPath: config, resumeFrom: resumeFrom, checkOnly: checkResumeSnapshot, fellBackFrom: upgradeFellBack,
            logger: makeLogger("holdfast.supervisor", role: "supervisor"))
        if code != 0 { throw ExitCode(code) }
    }
}

struct Upgrade: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Live upgrade: the daemon re-executes the binary now at its path, keeping its containers and every stream.",
        discussion: """
            The new binary is checked first (it must run and read the daemon's state); if it cannot, \
            the daemon goes on as it was and this command exits 1 with the reason. A new binary \
            that starts but cannot take over (or crashes before it serves) hands everything back \
            to the previous one: exit 1 with the reason, every process kept. Otherwise it \
            returns once the new binary serves (same pid, the same processes).
            """)

    @Option(help: "The daemon's control socket.") var socket: String = StatusPrinter.defaultSocket
    @Option(help: "Seconds to wait for the new binary to serve.") var timeout: Int = 60

    func run() async throws {
        try checkDaemonSocket(socket)
        do {
            let outcome = try await UpgradeClient.upgrade(socket: socket, timeout: .seconds(max(1, timeout)))
            let before = outcome.before
            let after = outcome.after
            let running = after.processes.filter { $0.state == .running }.count
            print(
                "upgraded: holdfast \(before.version) (sha256 \(before.executableSHA256?.prefix(12) ?? "?")) -> holdfast \(after.version) (sha256 \(after.executableSHA256?.prefix(12) ?? "?")), pid \(after.pid), \(running) process\(running == 1 ? "" : "es") still running, upgrade \(after.upgrades ?? 0) since start, in \(outcome.took.spoken)")
            // What the reload could not apply: before, only the log said so.
            for pending in after.settingsAwaitingRestart ?? [] {
                print("\(pending.key): configured \(pending.configured), running \(pending.running) until the next start (a live upgrade passes its fds on)")
            }
        } catch {
            throw CommandFailure("upgrade failed: \(error.description)")
        }
    }
}

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the daemon's roles, processes and streams.")

    @Option(help: "The daemon's control socket.") var socket: String = StatusPrinter.defaultSocket
    @Flag(help: "Print JSON for tools.") var json = false

    func run() async throws {
        let report: StatusReport
        try checkDaemonSocket(socket)
        do {
            report = try await StatusPrinter.fetch(socket: socket)
        } catch {
            throw CommandFailure("cannot reach the daemon at \(socket): \(error)\(StatusPrinter.connectAdvice(error))")
        }
        if json {
            print(String(decoding: ControlJSON.encode(report), as: UTF8.self))
        } else {
            print(StatusPrinter.render(report, colour: isatty(1) == 1))
        }
    }
}

struct ConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config", abstract: "Check a daemon configuration file.", subcommands: [Check.self])

    struct Check: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate a configuration file and print the effective configuration.",
            discussion: """
                Loads FILE exactly as 'holdfast daemon --config FILE' would (HOLDFAST_* environment \
                variables included) and prints every key with the value the daemon would use and \
                where it came from (file, environment or default). A bad file prints the file, the \
                key and the reason on standard error and exits with 2, as the daemon would.
                """)

        @Argument(help: "The configuration file (YAML or JSON).") var file: String
        @Flag(help: "Print JSON for tools (on an invalid file too).") var json = false

        func run() async throws {
            let check = await ConfigurationCheck.run(path: file)
            if json {
                print(check.renderJSON())
            } else if check.valid {
                print(check.renderText())
            } else {
                var standardError = StandardError()
                print("holdfast: \(check.renderText())", to: &standardError)
            }
            if !check.valid { throw ExitCode(2) }
        }
    }
}

struct StandardError: TextOutputStream {
    mutating func write(_ string: String) {
        var text = string
        text.withUTF8 { bytes in _ = Glibc.write(2, bytes.baseAddress, bytes.count) }
    }
}

/// Internal: the broker role, started by the supervisor.
struct BrokerRoleCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "broker", abstract: "(internal) The broker role.", shouldDisplay: false)

    @Option var controlFd: Int32
    @Option var handoffFd: Int32?
    @Option var handoffPath: String?
    @Option var checkpointsFd: Int32?
    @Option var ringsFd: Int32?
    @Option var settings: String

    func run() async throws {
        let logger = makeLogger("holdfast.broker", role: "broker")
        let parsed = try ControlJSON.decode(BrokerSettings.self, from: Array(settings.utf8), frameType: 0)
        try await BrokerRole.run(
            controlFD: controlFd, handoffFD: handoffFd, handoffPath: handoffPath, checkpointsFD: checkpointsFd, ringsFD: ringsFd, settings: parsed,
            logger: logger)
    }
}

/// Internal: the bridge worker role, started by the supervisor.
struct BridgeRoleCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bridge", abstract: "(internal) The bridge worker role.", shouldDisplay: false)

    @Option var controlFd: Int32
    @Option var address: String
    @Option var reconnectInitialMs: Int = 100
    @Option var reconnectMaxMs: Int = 5000
    @Option var authentication: String = BridgeAuthenticationMethod.hmacSHA256.rawValue
    @Option var keyFile: String?

    func run() async throws {
        let logger = makeLogger("holdfast.bridge", role: "bridge")
        SignalDisposition.ignore(SIGPIPE)
        let method: BridgeWorker.Authentication
        guard let chosen = BridgeAuthenticationMethod(rawValue: authentication) else {
            throw ValidationError("--authentication must be hmac-sha256 or none")
        }
        switch chosen {
        case .hmacSHA256:
            guard let keyFile else { throw ValidationError("--authentication hmac-sha256 needs --key-file") }
            method = .keyFile(keyFile)
        case .none: method = .none
        }
        let channel = FDChannel(try AsyncFD(adopting: controlFd))
        await BridgeWorker.run(
            supervisor: channel,
            options: .init(
                address: try parseAddress(address), authentication: method, reconnectInitial: .milliseconds(reconnectInitialMs),
                reconnectMax: .milliseconds(reconnectMaxMs)),
            logger: logger)
    }
}

/// Internal: load the broker's seccomp profile and try one operation (for tests).
struct SeccompProbeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "seccomp-probe", abstract: "(internal) Try an operation under the broker's seccomp profile.",
        shouldDisplay: false)

    @Option var action: String = "kill"
    @Argument var attempt: String

    func run() throws {
        guard let attempt = SeccompProbe.Attempt(rawValue: attempt), let action = SeccompAction(rawValue: action) else {
            throw ValidationError("unknown attempt or action")
        }
        let code = try SeccompProbe.run(attempt, action: action)
        throw ExitCode(code)
    }
}

/// Internal: from this process, try to take another's fds, trace it, read its memory and kill
/// it (for tests, run as another uid than the broker's).
struct ReachProbeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reach-probe", abstract: "(internal) Try to reach into another process: pidfd_getfd, ptrace, /proc/PID/mem, kill.",
        shouldDisplay: false)

    @Option var pid: Int32

    func run() throws {
        let attempts = ReachProbe.run(pid: pid)
        for attempt in attempts { print(attempt) }
        // 0: everything was refused.
        if attempts.contains(where: { $0.refusedWith == nil }) { throw ExitCode(1) }
    }
}

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the daemon and a host peer, migrate three times under a heartbeat, and judge what arrived.",
        discussion: """
            Starts 'holdfast daemon' (needs root) and a host peer on Unix sockets in a temp dir, \
            creates a heartbeat process over the bridge, drops every connection (bridge and streams) \
            and refuses new ones for each blackout, and checks that every heartbeat arrived once, in \
            order, and that the exit was reported once. --raw runs the older single-stream raw-mode \
            demo instead (a listener killed and restarted; no daemon, no root).
            """)

    @Option(help: "Heartbeat lines to print.") var beats = 60
    @Option(help: "Migrations (raw: listener restarts).") var migrations = 3
    @Option(help: "Blackout per migration, in milliseconds.") var blackout = 500
    @Flag(help: "The raw-mode relay demo (no daemon).") var raw = false

    func run() async throws {
        if raw { return try await runRaw() }
        let verdict: MigrationDemo.Verdict
        do {
            verdict = try await MigrationDemo.run(
                beats: beats, migrations: migrations, blackout: .milliseconds(blackout), executable: ownExecutable()) { print($0) }
        } catch let error as HoldfastError {
            print("demo: \(error.message)")
            throw ExitCode(1)
        }
        print("")
        print("received \(verdict.received.count) of \(verdict.expected) heartbeats: missing \(verdict.missing), duplicates \(verdict.duplicates), in order \(verdict.inOrder); exit code \(verdict.exitCode.map(String.init) ?? "none"), reported \(verdict.exitsReported) time(s)")
        if verdict.passed {
            print("verdict: PASS — \(migrations) migrations, nothing lost, nothing repeated, the exit reported once.")
        } else {
            print("verdict: FAIL")
            throw ExitCode(1)
        }
    }

    func runRaw() async throws {
        let verdict = try await RawDemo.run(beats: beats, restarts: migrations) { print($0) }
        print("")
        print("received \(verdict.received.count) of \(verdict.expected) heartbeats: duplicates \(verdict.duplicates), out of order \(verdict.outOfOrder), lost \(verdict.lost)")
        if verdict.passed {
            print("verdict: PASS — the stream followed every restart; nothing repeated or reordered.")
            if verdict.lost > 0 {
                print("         (raw mode: \(verdict.lost) line(s) a killed listener had already accepted are gone; resumable mode replays them)")
            }
        } else {
            print("verdict: FAIL")
            throw ExitCode(1)
        }
    }
}

/// This binary's path, for re-executing it (the demo starts the daemon).
func ownExecutable() -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    return String(decoding: buffer[..<max(0, length)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

extension StreamMode: ExpressibleByArgument {}

func parseAddress(_ text: String) throws -> SocketAddress {
    do {
        return try SocketAddress(parsing: text)
    } catch {
        throw ValidationError(error.description)
    }
}

struct Pipe: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Relay standard input to an address, redialing whenever the connection drops.")

    @Option(name: .customLong("to"), help: "Destination: unix:/path, tcp://HOST:PORT or vsock://CID:PORT.")
    var destination: String
    @Option(help: "raw (any listener) or resumable (exactly once; the far end must be 'holdfast receive').")
    var mode: StreamMode = .raw
    @Option(help: "The stream's token (resumable mode).") var token = "stdin"
    @Option(help: "Resumable mode: a file (mode 0600) with the stream's secret in hex, the one 'holdfast receive --secret-file' made.")
    var secretFile: String?
    @Option(help: "Dials before giving up (100 ms apart; each bounded by a 2 s connect timeout), at the start and whenever the connection drops.")
    var attempts = 60

    func validate() throws {
        guard attempts >= 1 else { throw ValidationError("--attempts must be at least 1") }
    }
    @Option(help: "Relay buffer size in bytes.") var buffer = 128 * 1024
    @Option(help: "Ask the kernel for a stdin pipe of this many bytes (F_SETPIPE_SZ).") var pipeSize: Int?

    func run() async throws {
        let address = try parseAddress(destination)
        var secret: StreamSecret?
        if mode == .resumable {
            guard let secretFile else { throw ValidationError("resumable mode needs --secret-file: the stream's secret, shared with 'holdfast receive'") }
            // `receive` makes the file when it starts: give it a moment (`receive ... &; pipe ...`).
            let deadline = ContinuousClock.now + .seconds(5)
            while access(secretFile, F_OK) != 0, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
            do {
                secret = try SecretFile.read(secretFile)
            } catch {
                throw CommandFailure("holdfast pipe: \(error)")
            }
        }
        let report: RelayReport
        do {
            report = try await PipeRelay.run(.init(
                destination: address, mode: mode, token: token, secret: secret, policy: RedialPolicy(attempts: attempts),
                bufferSize: buffer, pipeCapacity: pipeSize, say: { writeError($0) }))
        } catch let gaveUp as PipeRelay.GaveUp {
            throw CommandFailure("holdfast pipe: \(gaveUp)")
        }
        if report.undelivered > 0 {
            throw CommandFailure("holdfast pipe: \(report)")
        }
    }
}

struct Receive: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Listen for one stream and write it to standard output (the host end of 'holdfast pipe').")

    @Option(help: "Where to listen: unix:/path, tcp://HOST:PORT or vsock://CID:PORT.") var listen: String
    @Option(help: "raw or resumable.") var mode: StreamMode = .raw
    @Option(help: "The stream's token (resumable mode).") var token = "stdin"
    @Option(help: "Resumable mode: a file (mode 0600) with the stream's secret in hex; made with a new random secret if it does not exist.")
    var secretFile: String?
    @Option(help: "Raw mode: end after this many connections (0: never).") var connections = 1
    @Flag(help: "Do not write the stream: print how many bytes arrived.") var count = false
    @Option(name: [.customShort("o"), .long], help: "Write the stream to this file (made, or emptied first) instead of standard output.")
    var output: String?
    @Flag(help: ArgumentHelp(
        "Resumable mode, with --output: the file holds the start of this stream, written by an earlier 'holdfast receive' that was killed or stopped; go on after it.",
        discussion: "Only bytes written to the file are acknowledged, so the sender still has every byte after them: run the same command again and the file ends up whole, nothing lost or repeated."))
    var resume = false

    func validate() throws {
        if resume && mode != .resumable { throw ValidationError("--resume needs --mode resumable: a raw stream cannot go on where it stopped") }
        if resume && output == nil { throw ValidationError("--resume needs --output FILE: the file the earlier run wrote") }
        if count && output != nil { throw ValidationError("--count writes nothing: leave out --output") }
    }

    func run() async throws {
        var secret: StreamSecret?
        if mode == .resumable {
            guard let secretFile else { throw ValidationError("resumable mode needs --secret-file: the stream's secret, shared with 'holdfast pipe'") }
            do {
                secret = try SecretFile.readOrCreate(secretFile)
            } catch {
                throw CommandFailure("holdfast receive: \(error)")
            }
        }
        let destination: StreamReceiver.Destination =
            if let output { resume ? .resumingFile(output) : .file(output) } else { .standardOutput }
        let total: UInt64
        do {
            total = try await StreamReceiver.run(
                listen: try parseAddress(listen), mode: mode, token: token, secret: secret, connections: connections, discard: count,
                destination: destination)
        } catch let error as StreamReceiver.Gaps {
            throw CommandFailure("holdfast receive: \(error)")
        } catch let error as StreamReceiver.Unfinished {
            throw CommandFailure("holdfast receive: \(error)")
        } catch let error as StreamReceiver.CannotOpenOutput {
            throw CommandFailure("holdfast receive: \(error)")
        }
        if count { print(total) }
    }
}

/// Before asking the daemon at `socket` anything: a run directory that does not exist means no
/// daemon has run there (connecting would only say ENOENT), and root's request must not go to a
/// socket someone else could have put there.
func checkDaemonSocket(_ socket: String) throws(CommandFailure) {
    let directory = RunDirectory.directory(of: socket)
    if access(directory, F_OK) != 0 {
        throw CommandFailure("cannot reach the daemon at \(socket): \(directory) does not exist\(StatusPrinter.connectAdvice(errno: ENOENT))")
    }
    do throws(RunDirectory.Refusal) {
        try RunDirectory.checkBeforeConnecting(to: socket)
    } catch {
        throw CommandFailure("not asking \(socket): \(error)")
    }
}

/// A command that ran and failed (the daemon refused, the guest reported an error): printed as
/// "Error: ..." with exit code 1, without the usage text a ValidationError adds.
struct CommandFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
