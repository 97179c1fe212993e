import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A runtime is told whether the process it hands over survives a broker crash
/// (`survivesBrokerCrash` in the adopt's answer). Before, a process the broker could not keep —
/// every checkpoint slot of its range taken, no fd for the copies, no checkpoint area — was
/// answered `{}` like any other, relayed, and gone with the next crash, with no word of it
/// anywhere for a full slot range (the runtime believed it safe).
@Suite("A runtime knows whether its process survives a broker crash", .timeLimit(.minutes(3)))
struct HandoffCrashSurvivalTests {
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the broker's slots are taken at a failpoint, which only debug builds have"))
    func aRuntimeIsToldWhetherItsProcessSurvivesABrokerCrash() async throws {
        let daemon = try await DaemonFixture(
            environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.handoffSlotsTaken):unkept"], brokerRestartBackoffMax: "200ms")
        defer { daemon.cleanUp() }
        let unkeptOutput = collect(try daemon.streams.open(token: bytes("u-out"), direction: .receive))
        _ = try daemon.streams.open(token: bytes("k-out"), direction: .receive)
        let (keptPipe, unkeptPipe) = (try PipeEnds.make(), try PipeEnds.make())
        defer { close(keptPipe.write) }

        func adopt(_ process: String, _ token: String, _ fd: Int32) async throws -> AdoptResponse {
            let runtime = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
            defer { runtime.close() }
            let spec = daemon.spec(token)
            let request = BrokerRequest.adopt(AdoptRequest(process: process, streams: [
                StreamDescription(kind: .stdout, fd: 0, address: spec.address, mode: .resumable, token: spec.token, secret: spec.secret)
            ]))
            defer { close(fd) }
            let reply = try await runtime.request(request.frameType, body: request.body, descriptors: [fd])
            return try ControlJSON.decode(AdoptResponse.self, from: reply.frame.body, frameType: reply.frame.type)
        }
        #expect(try await adopt("kept", "k-out", keptPipe.read) == AdoptResponse(survivesBrokerCrash: true))
        #expect(try await adopt("unkept", "u-out", unkeptPipe.read) == AdoptResponse(survivesBrokerCrash: false))
        try await daemon.waitForLog("a handoff process is adopted without surviving a broker crash")
        let warned = daemon.log.split(separator: "\n").filter { $0.contains("without surviving a broker crash") }
        #expect(warned.count == 1 && warned[0].contains("process=unkept") && warned[0].contains("no free checkpoint slots"), "\(warned)")

        // Relayed all the same: what it writes reaches the host, exact.
        var random = SeededRandom(seed: 0x5A7E)
        let written = (0..<(16 * 1024)).map { _ in UInt8.random(in: 0...255, using: &random) }
        #expect(written.withUnsafeBytes { write(unkeptPipe.write, $0.baseAddress, $0.count) } == written.count)
        close(unkeptPipe.write)
        let received = try await withTimeout("the unkept process's output", .seconds(30)) { await unkeptOutput.value }
        #expect(sha256Hex(received) == sha256Hex(written), "\(received.count) of \(written.count) bytes")

        // And what each answer said holds: after a crash the next broker has the one, not the other.
        let broker = try #require(try await daemon.rolePID("broker"))
        kill(broker, SIGKILL)
        try await eventually("the next broker", timeout: .seconds(30)) {
            let next = try await daemon.rolePID("broker")
            return next != nil && next != broker
        }
        let processes = Set(try await daemon.brokerStreams().map(\.process))
        #expect(processes == ["kept"], "the kept process is back, the unkept one is gone: \(processes)\n\(daemon.log.suffix(6000))")
        #expect(try await daemon.stop() == .exited(0))
    }
}
