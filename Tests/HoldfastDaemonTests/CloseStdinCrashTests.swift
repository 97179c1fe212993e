import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The host's `close-stdin` must reach the process as end-of-file whatever the broker does.
/// Before, the broker closed its copy of the pipe and then told the supervisor, which closed its
/// own: a broker killed in between left the supervisor's copy open, the next broker was handed
/// the stdin again, and the process never read end-of-file; and a `close-stdin` that came while
/// the broker restarted was refused (`broker-unavailable`). Now the supervisor closes its copy
/// first and then asks the broker, waiting for one that restarts.
@Suite("close-stdin survives the broker's death", .timeLimit(.minutes(3)))
struct CloseStdinCrashTests {
    /// `cat` echoing its stdin, then saying it read end-of-file; two lines typed and echoed.
    /// The host's sender is returned to be kept open: its end would end the stdin by itself.
    static func startCat(_ daemon: DaemonFixture) async throws -> (input: StreamServer<AsyncFD>.Stream, output: Accumulator) {
        let input = try daemon.streams.open(token: bytes("cat-in"), direction: .send)
        let output = Accumulator(try daemon.streams.open(token: bytes("cat-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "cat", argv: ["sh", "-c", "cat; echo got-eof"], stdin: daemon.spec("cat-in"), stdout: daemon.spec("cat-out")))
        try await input.send(bytes("one\ntwo\n"))
        try await eventually("both lines echoed") { output.text == "one\ntwo\n" }
        return (input, output)
    }

    /// The host's `close-stdin`: nil when answered ok, else the error (checked after the
    /// end-of-file, so a failing run says which of the two went wrong).
    static func closeStdin(_ daemon: DaemonFixture) async -> HoldfastError? {
        do {
            try await daemon.bridge.closeStdin("cat")
            return nil
        } catch {
            return error
        }
    }

    static func expectEndOfFile(_ daemon: DaemonFixture, _ output: Accumulator, _ exits: ExitLog) async throws {
        try await eventually("the process read end-of-file", timeout: .seconds(30)) { output.text == "one\ntwo\ngot-eof\n" }
        try await eventually("its exit") { exits.count("cat") == 1 }
        let report = try #require(exits.all.first { $0.id == "cat" })
        #expect(report.exitCode == 0 && report.outputCutShort == nil, "\(report)")
    }

    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the broker dies at a failpoint, which only debug builds have"))
    func aBrokerKilledRightAfterClosingTheStdinLeavesItClosed() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.brokerStdinClosed):cat"])
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let (input, output) = try await Self.startCat(daemon)
        defer { withExtendedLifetime(input) {} }
        let broker = try #require(try await daemon.rolePID("broker"))
        let answer = await Self.closeStdin(daemon)
        try await eventually("the broker, dead inside, replaced") { try await daemon.rolePID("broker").map { $0 != broker } ?? false }
        try await Self.expectEndOfFile(daemon, output, exits)
        #expect(answer == nil, "close-stdin answered ok")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// The same for a runtime's `close-stdin` on the handoff socket: the broker has the
    /// supervisor close its copy before it answers. Before, it answered first and the relay
    /// told the supervisor later: a broker killed in between left the supervisor's copy open,
    /// and the process never read end-of-file.
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the broker dies at a failpoint, which only debug builds have"))
    func aRuntimesCloseStdinSurvivesTheBrokersDeathRightAfter() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.brokerStdinClosed):hcat"])
        defer { daemon.cleanUp() }
        let input = try daemon.streams.open(token: bytes("hcat-in"), direction: .send)
        defer { withExtendedLifetime(input) {} }
        let output = Accumulator(try daemon.streams.open(token: bytes("hcat-out"), direction: .receive))
        let stdin = try PipeEnds.make()
        let stdout = try PipeEnds.make()
        let cat = try daemon.processes.start(["sh", "-c", "cat; echo got-eof"], stdin: stdin.read, stdout: stdout.write)
        close(stdin.read)
        close(stdout.write)
        let runtime = try await daemon.handOver("hcat", [(.stdin, "hcat-in"), (.stdout, "hcat-out")], descriptors: [stdin.write, stdout.read])
        defer { runtime.close() }
        try await input.send(bytes("one\n"))
        try await eventually("the line echoed") { output.text == "one\n" }
        let broker = try #require(try await daemon.rolePID("broker"))
        let close = BrokerRequest.closeStdin(process: "hcat")
        _ = try? await runtime.request(close.frameType, body: close.body)
        try await eventually("the broker, dead inside, replaced") { try await daemon.rolePID("broker").map { $0 != broker } ?? false }
        try await eventually("the process read end-of-file", timeout: .seconds(30)) { output.text == "one\ngot-eof\n" }
        #expect(try await daemon.processes.wait(cat, timeout: .seconds(30)) == .exited(0))
        #expect(try await daemon.stop() == .exited(0))
    }

    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the broker's restarts fail at a failpoint, which only debug builds have"))
    func aCloseStdinWhileTheBrokerRestartsIsCarriedOut() async throws {
        let daemon = try await DaemonFixture(
            environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.roleStartFails):broker"], brokerRestartBackoffMax: "200ms")
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let (input, output) = try await Self.startCat(daemon)
        defer { withExtendedLifetime(input) {} }
        let broker = try #require(try await daemon.rolePID("broker"))
        kill(broker, SIGKILL)
        // No broker now, for ten failed starts.
        try await daemon.waitForLog("cannot start role")
        let answer = await Self.closeStdin(daemon)
        try await Self.expectEndOfFile(daemon, output, exits)
        #expect(answer == nil, "close-stdin answered ok")
        #expect(try await daemon.stop() == .exited(0))
    }
}
