import ArgumentParser
import HoldfastConfig
import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTools
import Synchronization

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
    @Option(help: ArgumentHelp(
        "The address the guest dials to reach --streams, when it is not --streams itself.",
        discussion: "For a VMM that hands the guest's vsock connections to a Unix socket (Firecracker's and Cloud Hypervisor's hybrid vsock): --streams unix:/run/vm1/v.sock_1025 --guest-streams vsock://2:1025."))
    var guestStreams: String?
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
    @Option(help: ArgumentHelp(
        "Where to keep each process's record, output and outcome, so that a restart of host serve loses none of them; 'none' keeps them in memory only.",
        discussion: "Default: host-state next to the control socket (\(HostDefaults.stateDirectory)). A host serve started again on the same directory takes its processes up where they were: their output resumes with nothing lost or repeated, their stdin stays open, and wait, attach, logs and ps know them."))
    var stateDir: String?

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
        let guestStreamsAddress = try guestStreams.map { try parseAddress($0) }
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
        let service: HostService
        do {
            service = try HostService(
                bridge: bridgeAddress, bridgeKey: key, streams: streamsAddress, guestStreams: guestStreamsAddress, control: control,
                logSize: parsedLogSize ?? HostDefaults.logSize, logsKept: logsKept, stateDirectory: stateDir == "none" ? nil : stateDir ?? directory + "/host-state"
            ) { writeLine(TerminalText.escaped($0)) }  // one line each: a guest's newline forges none
        } catch let error as HoldfastError {
            throw CommandFailure("holdfast host serve: \(error.message)")
        }
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
    (default Ctrl-P Ctrl-Q, typed on a terminal) or Ctrl-C (without -t: with a terminal it is \
    the process's) leave the process running and print how to reattach: exit 0 after the \
    detach keys; after Ctrl-C the client ends as killed by SIGINT (130), so a script stops. \
    Another client's attach takes the process from this one, which then exits 125, saying so.
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
            "The keys that detach this client from a process with a terminal (-t), leaving it running; without one, Ctrl-C detaches.",
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

    /// The interaction of a terminal client: these keys, Ctrl-C as a detach, and SIGTERM or
    /// SIGHUP (`timeout`, a cancelled job, a closed terminal) passed on to the process before
    /// the client lets go — as podman's `--sig-proxy` does. Before, they killed the client
    /// alone: the process ran on, its output waiting for a client that never came (its writes
    /// blocked once the guest's buffers filled).
    /// The signals that stop a client for the shell (`stopForTheShell`): Ctrl-Z, and a read or
    /// a terminal change from the background.
    static let stopSignals = [SIGTSTP, SIGTTIN, SIGTTOU]

    /// Who sent the signal passed on (said as the client lets go: "from pid 4242 (uid 0,
    /// timeout)"): a script's `timeout`, a cancelled CI job, an operator, or a stray kill.
    static let passedOnSender = Mutex<String?>(nil)

    func interaction() throws -> HostClient.Interaction {
        // One pipe for the three, each sorted to its own waiter. A signal ignored when the client
        // started stays ignored: `nohup holdfast host run ...` outlives the terminal's hang-up,
        // and passes nothing on.
        let passedOn = [SIGTERM, SIGHUP].filter { !SignalDisposition.isIgnored($0) }
        let stops = Self.stopSignals.filter { !SignalDisposition.isIgnored($0) }
        guard let pipe = try? SignalPipe(signals: [SIGINT] + passedOn + stops) else {
            return HostClient.Interaction(detachKeys: try keys())
        }
        let (interrupts, interrupt) = AsyncStream<Void>.makeStream()
        let (passed, pass) = AsyncStream<Int32>.makeStream()
        // Until the process has started (the create may wait 30 s for a guest) there is nothing
        // to detach from or pass a signal on to: the client ends at once, as Ctrl-C means.
        // Before, the signal waited for the start: Ctrl-C did nothing for as long, and the
        // process was then started and left running with no client.
        let starting = StartingFlag()
        Task {
            var passing = false
            while let received = await pipe.next() {
                if Self.stopSignals.contains(received.number) {
                    // Not passed on: Ctrl-Z stops this client, as it would a local command (with
                    // `-t` the terminal is raw, and Ctrl-Z reaches the process instead).
                    stopForTheShell(received.number, then: pipe)
                    continue
                }
                if starting.value.withLock({ $0 }) {
                    writeError(
                        "\nholdfast host: \(SignalNames.name(received.number)) before the process started; if the guest starts it still, 'holdfast host ps' lists it")
                    dieOf(received.number)
                }
                if received.number == SIGINT {
                    interrupt.yield()
                } else if passing {
                    // A second one while the first is passed on (a guest slow to answer): the
                    // client ends now, as a second Ctrl-C or TERM is meant.
                    dieOf(received.number)
                } else {
                    passing = true
                    let sender = received.sender
                    Self.passedOnSender.withLock { $0 = sender }
                    pass.yield(received.number)
                }
            }
        }
        return HostClient.Interaction(
            detachKeys: try keys(),
            interrupted: {
                for await _ in interrupts { return }
            },
            passOn: {
                for await number in passed { return number }
                return nil
            },
            started: { starting.value.withLock { $0 = false } })
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
        throw ValidationError(
            "unknown option '\(first)': not an option of this command (see --help); if it is the command's own, put '--' before the command")
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
        writeError("holdfast \(name): \(guestText(error))")
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
                "holdfast \(name): the exit came before the process's output had drained in the guest (its daemon stopping, its broker "
                    + "dying, or another process holding the output open): \(report.undelivered) bytes not delivered by then")
        } else if report.undelivered > 0 {
            writeError("holdfast \(name): \(report.undelivered) bytes of output were not delivered")
        }
        if let lost = report.lost, lost > 0 {
            writeError(
                "holdfast \(name): the guest's broker crashed while it held \(lost) bytes of this process's streams: they are lost "
                    + "(the offsets are in host serve's log and the daemon's)")
        }
        if let repeated = report.inputRepeated, repeated > 0 {
            writeError(
                "holdfast \(name): the guest's broker crashed inside a write to the process's stdin: up to \(repeated) bytes of it "
                    + "may have reached the process twice (the offsets are in the daemon's log)")
        }
        if report.wasLikelyOOMKilled {
            writeError(
                "holdfast \(name): killed by the guest kernel's OOM killer (a memory limit reached, or the guest out of memory)"
                    + ((report.oomKills ?? 0) > 0 ? "; \(report.oomKills ?? 0) OOM kills in its container while it ran" : ""))
        } else if let kills = report.oomKills, kills > 0 {
            writeError("holdfast \(name): the guest kernel's OOM killer killed \(kills) processes in its container while it ran")
        }
        throw ExitCode(report.exitCode)
    case .lost(let loss, _):
        writeError("holdfast \(name): lost: \(guestText(loss.message))")
        throw ExitCode(HostExitCode.holdfastFailure)
    case .detached(let id, let cause):
        // On a line of its own: a terminal in raw mode may have left the cursor mid-line.
        guard cause != .anotherClient else {
            // Not 0: a script's `host run job && next` must not go on as if the job were done.
            writeError("\r\nanother client attached to \(id) and has it now; this one let go (holdfast host attach \(id) takes it back)")
            throw ExitCode(HostExitCode.holdfastFailure)
        }
        writeError(cause == .readerGone
            ? "holdfast \(name): its output's reader went away: detached; \(id) runs on (holdfast host attach \(id))"
            : "\r\ndetached; reattach with: holdfast host attach \(id)")
        switch cause {
        case .detachKeys:
            throw ExitCode.success
        case .interrupt:
            // Die of SIGINT, as a shell expects of an interrupted command (a script stops).
            dieOf(SIGINT)
        case .passedOn(let number):
            let sender = DetachKeysOption.passedOnSender.withLock { $0 }.map { " (from \($0))" } ?? ""
            writeError("holdfast \(name): \(SignalNames.name(number))\(sender) passed on to \(id); its output goes on into its log (holdfast host logs \(id))")
            dieOf(number)
        case .anotherClient:
            throw ExitCode(HostExitCode.holdfastFailure)  // said above
        case .readerGone:
            // As a writer into a closed pipe ends (`cat log | head -1`).
            dieOf(SIGPIPE)
        }
    }
}

/// Whether a client's process is still being started (`DetachKeysOption.interaction`).
private final class StartingFlag: Sendable {
    let value = Mutex(true)
}

/// Ends this client as killed by `number`, as a shell expects of a command that was sent it.
/// (This thread may block it, as the concurrency pool's threads do: unblocked here.)
func dieOf(_ number: Int32) -> Never {
    // No `defer` runs past `raise`: the terminal is put back here.
    LocalTerminal.restore()
    raiseWithItsDefaultAction(number)
    exit(128 + number)
}

/// Raises `number` on this thread with the kernel's default action for it (this thread may
/// block it, as the concurrency pool's threads do: unblocked here). Returns only if that action
/// lets the process go on (a stop, once continued).
private func raiseWithItsDefaultAction(_ number: Int32) {
    signal(number, SIG_DFL)
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, number)
    pthread_sigmask(SIG_UNBLOCK, &set, nil)
    raise(number)
}

/// Stops this client as the shell asks (Ctrl-Z: SIGTSTP) with the terminal put back first, and
/// takes it up again once continued (`fg`, `bg`). Before, the stop was the kernel's default: the
/// shell got back a terminal left non-blocking (and raw, with `-t`) until the client went on,
/// and the next program reading it failed with EAGAIN. (A process group the kernel counts as
/// orphaned is not stopped by SIGTSTP: the client then just goes on.)
func stopForTheShell(_ number: Int32, then pipe: SignalPipe) {
    LocalTerminal.suspend()
    // Returns once the client is continued.
    raiseWithItsDefaultAction(number)
    pipe.hear(number)
    LocalTerminal.resume()
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
