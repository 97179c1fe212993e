import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The kernel refusing a stream's read or write for want of memory for a moment — ENOMEM
/// charging a pipe page, EFAULT faulting a replay-ring block back in, under a memory limit — is
/// waited out (`AsyncFD.shortageRetry`). Before, the broker took it for the stream's end: the
/// stdout's END went to the host while the process still wrote (its next write a SIGPIPE), its
/// stdin was closed under it. A debug-build failpoint makes the broker's first reads, writes and
/// splices on each of the process's fds fail so (`ShortageTests` provokes real EFAULTs).
@Suite("A broker short of memory for a moment ends no stream", .timeLimit(.minutes(2)))
struct StreamShortageTests {
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the calls fail at a failpoint, which only debug builds have"))
    func aProcessWhoseStdioTheKernelRefusesMemoryForLosesNothing() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.streamShortage):short"])
        defer { daemon.cleanUp() }
        let input = try daemon.streams.open(token: bytes("short-in"), direction: .send)
        let output = Accumulator(try daemon.streams.open(token: bytes("short-out"), direction: .receive))
        let errors = Accumulator(try daemon.streams.open(token: bytes("short-err"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "short",
            argv: ["sh", "-c", "i=0; while [ $i -lt 2000 ]; do i=$((i+1)); echo line $i; echo err $i >&2; done; cat; echo got-eof"],
            stdin: daemon.spec("short-in"), stdout: daemon.spec("short-out"), stderr: daemon.spec("short-err")))
        try await input.send(bytes("one\ntwo\n"))
        #expect(await input.finish() == 0, "every stdin byte acknowledged")
        let report = try await withDeadline("the process's exit", .seconds(60)) { try await daemon.wait("short") }
        #expect(report.exitCode == 0 && report.outputCutShort == nil, "\(report)")
        let expected = String(decoding: expectedLines(2000), as: UTF8.self) + "one\ntwo\ngot-eof\n"
        try await eventually("the whole stdout") { output.count >= expected.utf8.count }
        #expect(output.text == expected, "stdout exact, the typed lines after the counter")
        try await eventually("the whole stderr") { errors.count >= expectedLines(2000, prefix: "err").count }
        #expect(errors.text == String(decoding: expectedLines(2000, prefix: "err"), as: UTF8.self), "stderr exact")
        let runtime = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        let stats = try await runtime.call(BrokerRequest.stats, reply: BrokerStats.self)
        #expect((stats.ioShortages ?? 0) >= UInt64(Failpoint.injectedShortages), "waited out, and counted: \(stats)")
        // The metric says the same total at every scrape (a counter fed at each scrape once
        // added its whole total again at the next).
        func scraped() async throws -> String? {
            let text = try await runtime.call(BrokerRequest.metrics, reply: MetricsResponse.self).text
            return text.split(separator: "\n").first { $0.hasPrefix("holdfast_broker_io_shortages_total ") }.map(String.init)
        }
        let total = "holdfast_broker_io_shortages_total \(stats.ioShortages ?? 0)"
        #expect(try await scraped() == total)
        #expect(try await scraped() == total, "the same at the second scrape")
        #expect(!daemon.log.contains("SIGPIPE"))
        #expect(try await daemon.stop() == .exited(0))
    }
}
