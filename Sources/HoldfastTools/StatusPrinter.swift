import CHoldfastShims
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// `holdfast status`: what the daemon is doing, readable at a glance.
public enum StatusPrinter {
    /// The default control socket: `$HOLDFAST_RUN_DIR/control.sock`, else /run/holdfast/control.sock.
    public static var defaultSocket: String {
        let directory = getenv("HOLDFAST_RUN_DIR").map { String(cString: $0) } ?? "/run/holdfast"
        return directory + "/control.sock"
    }

    /// The daemon's status, or an error once `timeout` passed without an answer saying what its
    /// process is doing (a connection is taken into the listen backlog even while the daemon
    /// is stopped or held by a debugger: unbounded, `holdfast status` hung there).
    public static func fetch(socket: String, timeout: Duration = .seconds(10)) async throws -> StatusReport {
        let client = try await ControlClient.connect(to: socket)
        defer { client.close() }
        // The listener's pid, as the kernel recorded it when it began listening.
        let daemon = (client.transport as? SeqpacketFrames).flatMap { try? PeerCredentials.of($0.channel.socket).pid }
        let asking = Task { () -> Result<StatusReport, HoldfastError> in
            do throws(HoldfastError) {
                return .success(try await client.call(SupervisorRequest.status, reply: StatusReport.self))
            } catch {
                return .failure(error)
            }
        }
        guard let result = await asking.value(within: timeout) else {
            let state = daemon.map { "pid \($0) is \(ProcessRunState.of($0).explanation)" } ?? "its pid is unknown"
            throw NotAnswering(description: "it did not answer within \(timeout): \(state)")
        }
        return try result.get()
    }

    /// The daemon took the connection and did not answer.
    public struct NotAnswering: Error, CustomStringConvertible {
        public var description: String
    }

    /// What to check when the daemon's control socket cannot be reached.
    public static func connectAdvice(_ error: any Error) -> String {
        (error as? SystemError).map { connectAdvice(errno: $0.number) } ?? ""
    }

    /// Nothing listens on the socket (its process is gone).
    public static func isRefused(_ error: any Error) -> Bool {
        (error as? SystemError)?.number == ECONNREFUSED
    }

    public static func connectAdvice(errno: Int32) -> String {
        switch errno {
        case ENOENT:
            return "; is the daemon running? (systemctl status holdfast; a daemon with another run_directory: --socket PATH or HOLDFAST_RUN_DIR)"
        case EACCES, EPERM:
            return "; the control socket is root's (mode 0600): run as root (sudo holdfast status)"
        case ECONNREFUSED:
            return "; nothing listens there: the daemon has stopped (systemctl status holdfast; journalctl -u holdfast)"
        default:
            return ""
        }
    }

    public static func render(_ report: StatusReport, colour: Bool) -> String {
        let report = printable(report)
        func paint(_ text: String, _ code: String) -> String { colour ? "\u{1B}[\(code)m\(text)\u{1B}[0m" : text }
        // Green for working, yellow for waiting, red for lost.
        func state(_ bridge: BridgeState) -> String {
            switch bridge {
            case .up: return paint(bridge.rawValue, "32")
            case .down: return paint(bridge.rawValue, "31")
            }
        }
        func state(_ process: ProcessState) -> String {
            switch process {
            case .running: return paint(process.rawValue, "32")
            case .exited: return paint(process.rawValue, "33")
            case .starting, .done: return process.rawValue
            }
        }
        func state(_ stream: StreamState) -> String {
            switch stream {
            case .connected: return paint(stream.rawValue, "32")
            case .parked, .kept: return paint(stream.rawValue, "33")
            case .abandoned: return paint(stream.rawValue, "31")
            case .closed: return stream.rawValue
            }
        }
        // Live upgrades since the start (its uptime spans them), when there were any.
        let upgrades = (report.upgrades ?? 0) > 0 ? "  live upgrades: \(report.upgrades!)" : ""
        var lines = [
            "holdfast \(report.version)  pid \(report.pid)  up \(duration(report.uptimeSeconds))  bridge: \(state(report.bridge))\(upgrades)", "",
        ]
        for pending in (report.settingsAwaitingRestart ?? []).reversed() {
            lines.insert("\(pending.key): configured \(pending.configured), running \(pending.running) until the next start", at: 1)
        }
        if let fellBack = report.upgradesFellBack, fellBack > 0 {
            lines.insert(
                "live upgrades that fell back: \(fellBack) (the new binary could not take over; this one did again), the last: \(report.lastUpgradeFailure ?? "?")",
                at: 1)
        }
        lines += TextTable.lines(
            ["ROLE", "PID", "UPTIME", "RESTARTS", "LAST EXIT"],
            report.roles.map { [$0.name, $0.pid.map(String.init) ?? "-", duration($0.uptimeSeconds), String($0.restarts), $0.lastExit ?? "-"] })
        for role in report.roles {
            guard let why = role.notAnswering else { continue }
            lines.append("\(role.name): \(paint("not answering", "31")): \(why)")
        }
        lines.append("")
        if report.processes.isEmpty {
            lines.append("no processes")
        } else {
            lines += TextTable.lines(
                ["PROCESS", "PID", "STATE", "EXIT", "CPU", "PROCS", "OOM KILLS"],
                report.processes.map {
                    [$0.id, String($0.pid), state($0.state), $0.exitCode.map(String.init) ?? "-", $0.cpuSeconds.map(cpu) ?? "-",
                     $0.tasks.map(String.init) ?? "-", $0.oomKills.map(String.init) ?? "-"]
                })
        }
        if let omitted = report.omittedProcesses { lines.append("... and \(omitted) more processes") }
        // What a finished process's exit report says was lost, one line each (its streams are
        // gone from the table below by now).
        // An exit cut short counts what was still on its way (an output held open goes on): not
        // a loss, not final.
        for process in report.processes where process.undelivered != nil || process.lost != nil {
            var parts: [String] = []
            if let undelivered = process.undelivered {
                parts.append(
                    process.outputCutShort == true
                        ? "\(bytes(undelivered)) of output still on its way at the exit (not a final count)"
                        : "\(bytes(undelivered)) of output not delivered")
            }
            if let lost = process.lost { parts.append("\(bytes(lost)) lost in broker crashes") }
            let loss = process.lost != nil || (process.undelivered != nil && process.outputCutShort != true)
            lines.append("\(process.id): \(paint(parts.joined(separator: ", "), loss ? "31" : "33"))")
        }
        lines.append("")
        if report.streams.isEmpty {
            lines.append("no streams")
        } else {
            lines += TextTable.lines(
                ["PROCESS", "STREAM", "MODE", "STATE", "TO HOST", "FROM HOST", "RECONNECTS"],
                report.streams.map {
                    [$0.process, $0.kind.rawValue + ($0.direction.map { "/\($0)" } ?? ""), $0.mode.rawValue, state($0.state),
                     bytes($0.bytesToHost), bytes($0.bytesFromHost), String($0.reconnects)]
                })
        }
        // Why a parked stream cannot connect, one line each (the table stays narrow).
        for stream in report.streams {
            guard stream.state == .parked, let error = stream.lastDialError else { continue }
            let name = stream.process + " " + stream.kind.rawValue + (stream.direction.map { "/\($0)" } ?? "")
            lines.append("\(name): \(paint("cannot connect", "31")) to \(stream.address): \(error)")
        }
        // What broker crashes took from a stream (the host was told: a gap), one line each.
        for stream in report.streams {
            guard let lost = stream.lostBytes, lost > 0 else { continue }
            let name = stream.process + " " + stream.kind.rawValue + (stream.direction.map { "/\($0)" } ?? "")
            lines.append("\(name): \(paint("\(bytes(lost)) lost", "31")) in a broker crash (reported to the host as a gap)")
        }
        // An output an orphan holds open past its process's exit (its exit reported long ago).
        for stream in report.streams where stream.heldOpenPastExit == true {
            let name = stream.process + " " + stream.kind.rawValue
            lines.append("\(name): \(paint("held open past its process's exit", "33")) (a process it left writes on): relayed until it lets go")
        }
        // A runtime's process the supervisor holds no copy of, one line each.
        var unkept: Set<String> = []
        for stream in report.streams where stream.survivesBrokerCrash == false && unkept.insert(stream.process).inserted {
            lines.append("\(stream.process): \(paint("not kept for a broker crash", "33")): handed over without crash-survival (the broker's log says why); a broker crash ends its relay")
        }
        if let omitted = report.omittedStreams {
            let states = (report.streamStates ?? [:]).sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(separator: ", ")
            lines.append("... and \(omitted) more streams (all streams: \(states))")
        }
        return lines.joined(separator: "\n")
    }

    /// The report with the text others chose written out where it holds control characters:
    /// ids and addresses a runtime handed over, errors from outside. Printed as they came, an
    /// escape sequence in one reached root's terminal (title, clipboard, hidden lines), and
    /// threw the table's columns out.
    static func printable(_ report: StatusReport) -> StatusReport {
        let escaped = { (text: String) in TerminalText.escaped(text) }
        var report = report
        report.lastUpgradeFailure = report.lastUpgradeFailure.map(escaped)
        report.settingsAwaitingRestart = report.settingsAwaitingRestart?.map { pending in
            var pending = pending
            pending.configured = escaped(pending.configured)
            pending.running = escaped(pending.running)
            return pending
        }
        report.roles = report.roles.map { role in
            var role = role
            role.lastExit = role.lastExit.map(escaped)
            role.notAnswering = role.notAnswering.map(escaped)
            return role
        }
        report.processes = report.processes.map { process in
            var process = process
            process.id = escaped(process.id)
            return process
        }
        report.streams = report.streams.map { stream in
            var stream = stream
            stream.process = escaped(stream.process)
            stream.address = escaped(stream.address)
            stream.lastDialError = stream.lastDialError.map(escaped)
            return stream
        }
        return report
    }

    static func duration(_ seconds: Double) -> String {
        let total = Int(seconds)
        if total < 60 { return "\(total)s" }
        if total < 3600 { return "\(total / 60)m\(total % 60)s" }
        return "\(total / 3600)h\(total % 3600 / 60)m"
    }

    /// CPU seconds: "0.42s" under a minute, then as `duration`.
    static func cpu(_ seconds: Double) -> String {
        seconds < 60 ? "\((seconds * 100).rounded() / 100)s" : duration(seconds)
    }

    static func bytes(_ count: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(count)
        var unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return unit == 0 ? "\(count) B" : "\((value * 10).rounded() / 10) \(units[unit])"
    }
}
