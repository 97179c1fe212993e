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

// `host logs`, `ps`, `kill`, `migrate`, and the small helpers every host command shares.

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
        // Ended by a signal (Ctrl-C is how `-f` is left), the outputs' flags are put back first.
        // Ctrl-Z stops it with them put back, until `fg`.
        let stops = DetachKeysOption.stopSignals
        if let signals = try? SignalPipe(signals: ([SIGINT, SIGTERM, SIGHUP] + stops).filter { !SignalDisposition.isIgnored($0) }) {
            Task {
                while let received = await signals.next() {
                    guard stops.contains(received.number) else { dieOf(received.number) }
                    stopForTheShell(received.number, then: signals)
                }
            }
        }
        do {
            try await HostClient.logs(control: control, id: id, follow: follow)
        } catch {
            writeError("holdfast host logs: \(guestText(error))")
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
    @Flag(name: .shortAndLong, help: "Print the ids only, one per line (podman ps -q).") var quiet = false
    @Option(help: "'json' prints JSON (as --json; podman's --format json).") var format: String?

    func validate() throws {
        if let format, format != "json" { throw ValidationError("--format: only 'json' (or leave it out for the table)") }
        if quiet, json || format != nil { throw ValidationError("-q prints ids only: leave out --json/--format") }
    }

    func run() async throws {
        let list: HostProcessList
        do {
            list = try await HostClient.processes(control: control, all: all)
        } catch {
            writeError("holdfast host ps: \(guestText(error))")
            throw ExitCode(HostExitCode.holdfastFailure)
        }
        if !list.guestAnswered {
            writeError(
                "holdfast host ps: the guest did not answer (not connected to host serve, or connected but stopped or overloaded: 'holdfast status' in the guest says which): this is what host serve knows")
        }
        if quiet {
            for process in list.processes { print(TerminalText.escaped(process.id)) }
        } else {
            print(json || format == "json" ? String(decoding: ControlJSON.encode(list), as: UTF8.self) : HostClient.render(list))
        }
    }
}

struct HostKill: AsyncParsableCommand, HostFamilyCommand {
    static let configuration = CommandConfiguration(
        commandName: "kill", abstract: "Signal processes in the guest.",
        discussion: """
            Prints each id once it was signalled. With -s every argument is a process id \
            (podman's and docker's form); without it, ID [SIGNAL]. Exits 125 if any could not \
            be signalled (the others still are).
            """)
    @Option(help: "host serve's control socket.") var control = HostDefaults.control
    @Option(name: [.customShort("s"), .long], help: "The signal: a name (TERM, SIGKILL, RTMIN+1...) or a number from 1 to 64 (default KILL, as podman's: 'host stop' is the polite one).")
    var signal: String?
    @Argument(help: "The process ids (without -s: ID [SIGNAL]).") var arguments: [String]

    /// The ids and the signal the arguments name.
    func target() throws -> (ids: [String], signal: Int32) {
        guard !arguments.isEmpty else { throw ValidationError("name a process: holdfast host kill [-s SIGNAL] ID...") }
        if let signal { return (arguments, try parseSignal(signal)) }
        guard arguments.count <= 2 else {
            throw ValidationError("more than one process: name the signal with -s (holdfast host kill -s SIGNAL ID...)")
        }
        return ([arguments[0]], try parseSignal(arguments.count == 2 ? arguments[1] : "KILL"))
    }

    func validate() throws { _ = try target() }

    func run() async throws {
        let (ids, number) = try target()
        // `kill 1 2` in podman's habit (two ids) read as ID SIGNAL would send SIGINT to 1 alone:
        // refused when the second word is also a process's id.
        if signal == nil, arguments.count == 2 {
            let known: HostProcessList
            do {
                known = try await HostClient.processes(control: control, all: true)
            } catch {
                // Unchecked, it could be the two-id habit: not sent (a SIGINT to the first).
                writeError("holdfast host kill: \(guestText(error))")
                throw ExitCode(HostExitCode.holdfastFailure)
            }
            if known.processes.contains(where: { $0.id == arguments[1] }) {
                writeError("holdfast host kill: '\(arguments[1])' is both a signal and a process's id: name the signal with -s (holdfast host kill -s SIGNAL ID...)")
                throw ExitCode(HostExitCode.holdfastFailure)
            }
        }
        var failed = false
        for id in ids {
            do {
                try await HostClient.signal(control: control, id: id, signal: number)
                print(id)
            } catch {
                writeError("holdfast host kill: \(id): \(guestText(error))")
                failed = true
            }
        }
        if failed { throw ExitCode(HostExitCode.holdfastFailure) }
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
            writeError("holdfast host migrate: \(guestText(error))")
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

/// Text that came from the guest (through host serve), for a line of ours: every control
/// character written out, line breaks too — a guest's `\n` forged a line of ours, its `\r` wrote
/// over the start of one.
func guestText(_ value: some CustomStringConvertible) -> String { TerminalText.escaped(value.description) }

/// One line to stdout, unbuffered: a log read while the service runs must be current. Control
/// characters but line breaks are written out: a line may carry what a guest sent (an exit's
/// id, an error's text), and the guest may be compromised.
func writeLine(_ text: String) {
    var line = Array((TerminalText.escaped(text, keepingLineBreaks: true) + "\n").utf8)
    var offset = 0
    while offset < line.count {
        let count = line[offset...].withUnsafeBytes { Glibc.write(1, $0.baseAddress, $0.count) }
        if count <= 0 { return }
        offset += count
    }
    line.removeAll()
}

/// One line to stderr, unbuffered; control characters but line breaks written out (`writeLine`).
func writeError(_ text: String) {
    let line = Array((TerminalText.escaped(text, keepingLineBreaks: true) + "\n").utf8)
    var offset = 0
    while offset < line.count {
        let count = line[offset...].withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
        if count <= 0 { return }
        offset += count
    }
}
