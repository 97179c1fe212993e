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

/// A container that writes its stdout as fast as it can (`cat /dev/zero`), to a host that reads
/// as fast as it can: the broker's reactor moves it in bounded turns, so every other stream goes
/// on meanwhile, and so do the control plane and the bridge.
@Suite("A container flooding its stdout starves nothing else", .timeLimit(.minutes(3)))
struct FloodFairnessTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func aFloodingContainerLeavesEveryOtherStreamMoving() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        // The flood: counted at the host, not kept.
        let flood = try daemon.streams.open(token: bytes("flood-out"), direction: .receive)
        let flooded = NIOLockedValueBox<Int>(0)
        let draining = Task {
            for await chunk in flood.chunks() { flooded.withLockedValue { $0 += chunk.count } }
        }
        defer { draining.cancel() }
        _ = try await daemon.bridge.create(ProcessSpec(id: "flood", argv: ["cat", "/dev/zero"], stdout: daemon.spec("flood-out")))
        try await eventually("the flood flowing") { flooded.withLockedValue { $0 } > 64 << 20 }

        // Meanwhile: a counter, an echo both ways, creates and status.
        let counter = collect(try daemon.streams.open(token: bytes("counter-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "counter", argv: counterCommand(300, prefix: "by", pause: "0.005"), stdout: daemon.spec("counter-out")))
        let typed = try daemon.streams.open(token: bytes("echo-in"), direction: .send)
        let echoed = collect(try daemon.streams.open(token: bytes("echo-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(id: "echo", argv: ["cat"], stdin: daemon.spec("echo-in"), stdout: daemon.spec("echo-out")))
        let lines = expectedLines(200, prefix: "typed")
        for line in String(decoding: lines, as: UTF8.self).split(separator: "\n") {
            try await typed.send(bytes(line + "\n"))
        }
        #expect(await typed.finish() == 0)
        for round in 1...5 {
            _ = try await withTimeout("create \(round) during the flood", .seconds(20)) {
                try await daemon.bridge.create(ProcessSpec(id: "short-\(round)", argv: ["sh", "-c", "exit \(round)"]))
            }
            _ = try await withTimeout("status during the flood", .seconds(20)) { try await daemon.status() }
        }
        #expect(try await withTimeout("the counter's output during the flood", .seconds(60)) { await counter.value } == expectedLines(300, prefix: "by"))
        #expect(try await withTimeout("the echo during the flood", .seconds(60)) { await echoed.value } == lines)
        try await eventually("their exits during the flood", timeout: .seconds(30)) {
            (["counter", "echo"] + (1...5).map { "short-\($0)" }).allSatisfy { exits.count($0) == 1 }
        }
        #expect(exits.count("flood") == 0, "the flood was still running throughout")
        let moved = flooded.withLockedValue { $0 }
        print("while \(moved >> 20) MiB of flood moved: 300 counter lines, 200 echoed lines, 5 creates and 5 status exact and answered")
        try await daemon.bridge.signal("flood", SIGKILL)
        try await eventually("the flood's exit", timeout: .seconds(30)) { exits.count("flood") == 1 }
        #expect(try await daemon.stop() == .exited(0))
    }
}
