import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Requests near the 64 KiB frame limit: each is answered (or refused) alone, and nothing else
/// breaks. Before, the bridge worker passed a request on re-encoded — slashes escaped, up to
/// twice the size the host sent — and an error naming a long id grew past the frame too: the
/// supervisor's or the worker's channel broke, the worker restarted and every stream was cut.
@Suite("Requests near the frame limit", .serialized, .timeLimit(.minutes(5)))
struct BridgeFrameSizeTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func requestsNearTheFrameLimitAreAnsweredAloneAndNothingElseBreaks() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        _ = try await daemon.bridge.create(ProcessSpec(id: "bystander", argv: ["sleep", "60"]))
        let connections = daemon.bridge.acceptedConnections

        // A create with a 40,000-slash variable (a long PATH-like value) within the limit: run.
        let slashes = String(repeating: "/", count: 40_000)
        let lengthFile = daemon.directory.file("length")
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "slashes", argv: ["sh", "-c", "printf %s \"$P\" | wc -c > \(lengthFile)"], env: ["P=\(slashes)", "PATH=/usr/bin:/bin"]))
        try await eventually("the slashes' exit") { exits.count("slashes") == 1 }
        #expect(String(decoding: readFile(lengthFile) ?? [], as: UTF8.self).filter(\.isNumber) == "40000")

        // A signal to a 62,000-byte id nobody has: refused by name, the message cut to fit.
        let longID = String(repeating: "a", count: 62_000)
        do {
            try await daemon.bridge.signal(longID, SIGTERM)
            Issue.record("a signal to a process nobody has was carried out")
        } catch {
            #expect(error.code == .noSuchProcess, "\(error)")
            #expect(error.message.utf8.count < 5000 && error.message.contains("cut to"), "\(error.message.prefix(200))")
        }

        // A request past the limit: refused before it is sent, the connection kept.
        do {
            try await daemon.bridge.signal(String(repeating: "b", count: 70_000), SIGTERM)
            Issue.record("a 70 KiB request was sent")
        } catch {
            #expect(error.code == .frameTooLarge, "\(error)")
        }

        // Nothing else broke: the same connection, no role restarted, the bystander still runs.
        let listed = try await daemon.bridge.list()
        #expect(listed.processes.contains { $0.id == "bystander" && $0.state == .running })
        #expect(daemon.bridge.acceptedConnections == connections, "the bridge was not cut")
        #expect(try await daemon.status().roles.allSatisfy { $0.restarts == 0 }, "\(daemon.log.suffix(2000))")
        try await daemon.bridge.signal("bystander", SIGTERM)
        try await eventually("the bystander's exit") { exits.count("bystander") == 1 }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// `list` with `streamsOffset`: the streams alone, a page from that index in the broker's
    /// order (by process), so a host can read every stream, not only those that fit one reply.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func theStreamsAreReadPageByPage() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        for id in ["c", "a", "b"] {
            _ = try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive)
            _ = try await daemon.bridge.create(ProcessSpec(id: id, argv: ["sleep", "60"], stdout: daemon.spec("\(id)-out")))
        }
        try await eventually("three streams") { try await daemon.bridge.list(BridgeListRequest(streamsOffset: 0)).streams.count == 3 }
        let first = try await daemon.bridge.list(BridgeListRequest(streamsOffset: 0))
        #expect(first.streams.map(\.process) == ["a", "b", "c"] && first.processes.isEmpty && first.omittedStreams == nil, "\(first)")
        let rest = try await daemon.bridge.list(BridgeListRequest(streamsOffset: 2))
        #expect(rest.streams.map(\.process) == ["c"])
        #expect(try await daemon.bridge.list(BridgeListRequest(streamsOffset: 5)).streams.isEmpty)
        #expect(try await daemon.stop() == .exited(0))
    }
}
