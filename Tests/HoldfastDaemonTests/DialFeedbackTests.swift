import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A stream that cannot connect says so, and keeps trying (issue 18, "Feedback").
@Suite("Failed dials are reported and retried", .timeLimit(.minutes(5)))
struct DialFeedbackTests {
    /// A host listener the broker's unprivileged user may not open (mode 0600, root's): the
    /// stream parks; the daemon logs the dial error once (not once per attempt), `holdfast
    /// status` shows it (text and JSON) with the failed dials counting up across redial cycles
    /// that gave up; when the socket is opened up, the stream connects by itself — the bridge
    /// never went down, so no bridge-up kicked it — and its bytes arrive once.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aStreamWhoseDialFailsSaysWhyAndConnectsOnceItCan() async throws {
        // Three dials per cycle: a cycle gives up within a fraction of a second.
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_STREAMS_REDIAL_ATTEMPTS": "3"])
        defer { daemon.cleanUp() }
        let path = daemon.directory.file("private-streams.sock")
        let server = try StreamServer(listeningOn: .unix(path: path), unixMode: 0o600)
        defer { server.close() }
        let stdout = try server.open(token: bytes("locked-stdout"), direction: .receive)
        server.start()
        let received = NIOLockedValueBox<[UInt8]>([])
        let reader = Task {
            for await chunk in stdout.chunks() { received.withLockedValue { $0 += chunk } }
        }
        defer { reader.cancel() }

        _ = try await daemon.launch(ProcessSpec(
            id: "locked", argv: ["sh", "-c", "echo through-at-last; exec sleep 1000"], stdout: stdout.streamSpec(at: "unix:" + path)))
        var parked: StreamStatus?
        try await eventually("the stream parked with its dial error, over more than two redial cycles") {
            parked = try await daemon.brokerStreams().first { $0.process == "locked" }
            return parked?.state == .parked && (parked?.failedDials ?? 0) > 6
        }
        let error = try #require(parked?.lastDialError)
        #expect(error.contains("Permission denied"), "\(error)")
        #expect(error.contains(path), "\(error)")

        // One warning for the one cause, however many dials failed (it reaches the file through
        // the broker's log writer thread: waited for before the lines are counted).
        func dialWarnings() -> [Substring] { daemon.log.split(separator: "\n").filter { $0.contains("stream dial failed") && $0.contains("process=locked") } }
        try await eventually("the dial warning in the log") { !dialWarnings().isEmpty }
        let warnings = dialWarnings()
        #expect(warnings.count == 1, "\(warnings)")
        #expect(warnings.first?.contains("Permission denied") == true && warnings.first?.contains("stream=stdout") == true)

        // status, as an operator reads it.
        let status = try await statusOutput(daemon, json: false)
        #expect(status.contains("locked stdout: cannot connect to unix:\(path): "), "\(status)")
        let json = try ControlJSON.decode(StatusReport.self, from: bytes(try await statusOutput(daemon, json: true)), frameType: 0)
        #expect(json.streams.first { $0.process == "locked" }?.lastDialError?.contains("Permission denied") == true)

        // Opened up: the stream connects on its own, and says so.
        #expect(chmod(path, 0o666) == 0)
        try await eventually("the bytes through", timeout: .seconds(60)) { received.withLockedValue { $0 } == bytes("through-at-last\n") }
        let connected = try await daemon.brokerStreams().first { $0.process == "locked" }
        #expect(connected?.state == .connected && connected?.lastDialError == nil && connected?.failedDials == nil, "\(String(describing: connected))")
        try await eventually("the recovery logged") { daemon.log.contains("stream connected after failed dials") }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// `holdfast pipe` with nothing listening: says why each new way it fails, then gives up
    /// after --attempts with the reason and what was not delivered, exiting non-zero.
    @Test func pipeReportsFailedDialsAndGivesUp() async throws {
        let processes = TestProcesses()
        defer { processes.killAll() }
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        try writeFile(directory.file("in"), bytes("twelve bytes"))
        let input = open(directory.file("in"), O_RDONLY | O_CLOEXEC)
        let err = open(directory.file("err"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let pid = try processes.start(
            [holdfastExecutable(), "pipe", "--to", "unix:" + directory.file("nobody.sock"), "--attempts", "5"], stdin: input, stderr: err)
        close(input)
        close(err)
        let status = try await processes.wait(pid, timeout: .seconds(60))
        let said = String(decoding: readFile(directory.file("err")) ?? [], as: UTF8.self)
        #expect(status == .exited(1), "\(said)")
        let lines = said.split(separator: "\n")
        #expect(lines.filter { $0.contains("cannot connect to unix:") }.count == 1, "once per reason: \(said)")
        #expect(lines.first?.contains("No such file or directory (errno 2) (attempt 1 of 5; retrying)") == true, "\(said)")
        #expect(lines.last?.contains("gave up after 5 attempts to connect to unix:\(directory.file("nobody.sock"))") == true, "\(said)")
        // A raw relay parks before it reads while it has no connection (the spliced relay waits
        // for the socket), so the bytes may still be in its stdin: then nothing was lost and
        // nothing is said; if it had read them, it says they were not delivered.
        let last = lines.last.map(String.init) ?? ""
        #expect(last.hasSuffix("errno 2)") || last.hasSuffix("; 12 bytes not delivered"), "\(said)")
    }
}

/// `holdfast status [--json]` against the fixture's daemon, as printed.
private func statusOutput(_ daemon: DaemonFixture, json: Bool) async throws -> String {
    let path = daemon.directory.file("status.\(UInt32.random(in: 0..<UInt32.max))")
    let out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    let pid = try daemon.processes.start(
        [holdfastExecutable(), "status", "--socket", daemon.directory.file("control.sock")] + (json ? ["--json"] : []), stdout: out)
    close(out)
    _ = try await daemon.processes.wait(pid, timeout: .seconds(30))
    return String(decoding: readFile(path) ?? [], as: UTF8.self)
}
