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

/// A hostile host that pipelines requests faster than it reads the replies must not grow the
/// guest's memory: the bridge worker reads a bounded number of requests ahead, the kernel's
/// socket buffers fill, and the host blocks in its own write. Afterwards memory goes back.
@Suite("The bridge under a flood of pipelined requests", .timeLimit(.minutes(5)))
struct BridgeFloodTests {
    static let requestsPerRound = 20_000
    static let rounds = 3

    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func pipelinedRequestsAreBoundedAndMemoryComesBack() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        // A bystander streams a counter throughout.
        let output = collect(try daemon.streams.open(token: bytes("b-out"), direction: .receive))
        _ = try await daemon.launch(ProcessSpec(
            id: "b", argv: counterCommand(400, prefix: "b", pause: "0.01"),
            stdout: daemon.spec("b-out")))

        daemon.bridge.close()
        let raw = try Listener(binding: .unix(path: daemon.directory.file("host-bridge.sock")), unixMode: 0o666)
        defer { raw.close() }
        let host = try await acceptAuthenticatedGuest(on: raw, key: try #require(daemon.key))
        defer { host.close() }
        let hello = try await ControlFrameIO.read(from: host, maxBody: BridgeProtocol.maxBody)
        #expect(hello.type == BridgeMessageType.hello.rawValue)

        let supervisor = daemon.daemonPID
        let worker = try #require(try await daemon.rolePID("bridge"))
        // Warm-up: the first requests grow pools and caches that stay.
        _ = try await flood(host, ids: 1...500, holdRepliesFor: .zero)
        try await Task.sleep(for: .seconds(3))
        let baseline = (residentKiB(supervisor), residentKiB(worker))

        var peak = baseline
        var nextID: UInt64 = 1000
        for round in 1...Self.rounds {
            let ids = nextID...(nextID + UInt64(Self.requestsPerRound) - 1)
            nextID += UInt64(Self.requestsPerRound)
            let sampler = Task {
                var highest = (0, 0)
                while !Task.isCancelled {
                    highest = (max(highest.0, residentKiB(supervisor)), max(highest.1, residentKiB(worker)))
                    try? await Task.sleep(for: .milliseconds(20))
                }
                return highest
            }
            // The host reads nothing for 2 s while it writes: everything it sent then is either
            // in the kernel's buffers or read ahead (bounded) by the worker.
            let written = try await flood(host, ids: ids, holdRepliesFor: .seconds(2))
            sampler.cancel()
            let highest = await sampler.value
            peak = (max(peak.0, highest.0), max(peak.1, highest.1))
            print("flood round \(round): \(written.requests) requests, \(written.replies) replies; peak RSS supervisor \(highest.0) KiB, bridge worker \(highest.1) KiB")
        }
        // Back near the baseline once the flood is over (the roles give free pages back).
        var after = (0, 0)
        try await eventually("memory back near the baseline", timeout: .seconds(30)) {
            after = (residentKiB(supervisor), residentKiB(worker))
            return after.0 - baseline.0 < 8 * 1024 && after.1 - baseline.1 < 8 * 1024
        }
        print(
            "bridge flood (\(Self.rounds) × \(Self.requestsPerRound) pipelined list requests): supervisor \(baseline.0) → peak \(peak.0) → \(after.0) KiB; bridge worker \(baseline.1) → peak \(peak.1) → \(after.1) KiB"
        )
        #expect(peak.0 - baseline.0 < 16 * 1024, "the supervisor's memory is bounded under the flood")
        #expect(peak.1 - baseline.1 < 16 * 1024, "the bridge worker's memory is bounded under the flood")

        #expect(try await daemon.wait("b").exitCode == 0)
        #expect(await output.value == expectedLines(400, prefix: "b"), "the bystander's stream never noticed")
        #expect(try await daemon.status().roles.allSatisfy { $0.restarts == 0 })
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Writes a `list` request for every id while a reader, after `holdRepliesFor`, reads the
    /// replies; checks every id is answered exactly once (no gap, no duplicate).
    func flood(_ host: AsyncFD, ids: ClosedRange<UInt64>, holdRepliesFor hold: Duration) async throws -> (requests: Int, replies: Int) {
        let writer = Task {
            var batch: [UInt8] = []
            for id in ids {
                batch += ControlFrame(type: BridgeMessageType.list.rawValue, id: id, body: bytes("{}")).encoded
                if batch.count >= 64 * 1024 {
                    try await FrameIO.write(batch, to: host)
                    batch.removeAll(keepingCapacity: true)
                }
            }
            if !batch.isEmpty { try await FrameIO.write(batch, to: host) }
        }
        try await Task.sleep(for: hold)
        let (answered, duplicates) = try await withTimeout("\(ids.count) replies", .seconds(120)) {
            var seen = Set<UInt64>()
            var repeated = 0
            while seen.count < ids.count {
                let reply = try await ControlFrameIO.read(from: host, maxBody: BridgeProtocol.maxBody)
                #expect(reply.type == BridgeMessageType.ok.rawValue, "every list is answered")
                if reply.id == 0 { continue }  // an exit pushed meanwhile
                if !seen.insert(reply.id).inserted { repeated += 1 }
            }
            return (seen, repeated)
        }
        try await writer.value
        #expect(answered == Set(ids), "no request unanswered")
        #expect(duplicates == 0, "no reply twice")
        return (ids.count, answered.count)
    }
}
