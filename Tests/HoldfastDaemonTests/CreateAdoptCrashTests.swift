import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A create hands the new process's streams to the broker (`adopt`) before it is answered. A
/// broker that died there — before it adopted them, or after, before its answer — made the
/// supervisor kill the process and answer `channel-closed`, which the host reads as a lost
/// bridge: it sent the create again and the command ran twice, after some output of the first
/// had reached the host. Now the process runs on and the next broker is handed it like any
/// other it held.
@Suite("A broker that dies inside a create's adopt", .timeLimit(.minutes(3)))
struct CreateAdoptCrashTests {
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the broker dies at a failpoint, which only debug builds have"),
        arguments: [Failpoint.brokerCreateReceived, Failpoint.brokerCreateTaken])
    func theProcessRunsOnceAndItsOutputArrivesExact(moment: String) async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(moment):printer"])
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let starts = daemon.directory.file("starts")
        let output = Accumulator(try daemon.streams.open(token: bytes("printer-out"), direction: .receive))
        let broker = try #require(try await daemon.rolePID("broker"))
        let pid = try await daemon.bridge.create(ProcessSpec(
            id: "printer", argv: ["sh", "-c", "echo started >> \(starts); seq 1 2000"], stdout: daemon.spec("printer-out")))
        #expect(pid > 0)
        try await eventually("the broker, dead inside, replaced") { try await daemon.rolePID("broker").map { $0 != broker } ?? false }
        try await eventually("its exit", timeout: .seconds(30)) { exits.count("printer") == 1 }
        let expected = (1...2000).map { "\($0)\n" }.joined()
        try await eventually("every line", timeout: .seconds(30)) { output.text.count >= expected.count }
        #expect(output.text == expected, "every line once, in order (\(output.text.count) of \(expected.count) bytes)")
        let report = try #require(exits.all.first { $0.id == "printer" })
        #expect(report.exitCode == 0 && report.outputCutShort == nil, "\(report)")
        #expect(readFile(starts) == bytes("started\n"), "the command ran once")
        #expect(daemon.bridge.repeatedCreates == 0, "the create was answered the first time")
        try await daemon.waitForLog("the broker died while it was handed a new process: its successor takes it")
        #expect(try await daemon.stop() == .exited(0))
    }
}
