import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("A host application that gives up on a stream", .timeLimit(.minutes(5)))
struct HostGaveUpTests {
    /// Found by the loaded soak (RELIABILITY.md): a host application's stdin gives up (its drain
    /// timeout passes while the host is away) and its token stays registered. The broker's stdin
    /// is then refused `unknown stream` and redials at its policy's pace — before the host's fix
    /// every dial was accepted and dropped at once, and the broker reconnected without a pause,
    /// thousands of times — while the process and its stdout carry on, and its warning about the
    /// failed dials is one line, not one per dial.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aStdinTheHostGaveUpOnIsRedialledAtItsPaceWhileTheProcessGoesOn() async throws {
        try await withBridgeDaemon(drainTimeout: "300s") { daemon, exits in
            let input = try daemon.streams.open(
                token: bytes("gave-up-in"), direction: .send, configuration: ResumableConfiguration(drainTimeout: .milliseconds(300)))
            let output = collect(try daemon.streams.open(token: bytes("gave-up-out"), direction: .receive))
            _ = try await daemon.bridge.create(
                ProcessSpec(
                    id: "gave-up", argv: ["cat"], stdin: daemon.spec("gave-up-in"),
                    stdout: daemon.spec("gave-up-out")))
            try await eventually("stdin connected") { input.slot.phase == .connected }
            try await input.send(bytes("before the host gave up\n"))
            try await eventually("the line acknowledged") { input.statistics.acknowledged == 24 }

            // The host goes away (its stdin's connection cut, nothing accepted) for longer than
            // its stdin waits without progress: the stream gives up on its unsent bytes.
            daemon.streams.setRefusing(true)
            input.slot.disconnect()
            try await input.send(bytes("never delivered\n"))
            #expect(await input.finish() == 16)
            #expect(daemon.streams.stream(for: bytes("gave-up-in")) != nil, "the application has not closed the token")
            daemon.streams.setRefusing(false)

            // The broker's stdin is refused from now on, and paced: it never connects again.
            func brokerStdin() async throws -> StreamStatus? {
                try await daemon.brokerStreams().first { $0.process == "gave-up" && $0.kind == .stdin }
            }
            try await Task.sleep(for: .milliseconds(500))
            let reconnectsBefore = try #require(try await brokerStdin()).reconnects
            let before = daemon.streams.statistics
            try await Task.sleep(for: .seconds(2))
            let after = daemon.streams.statistics
            let reconnectsAfter = try #require(try await brokerStdin()).reconnects
            let accepted = after.accepted - before.accepted
            print(
                "a stdin the host gave up on: \(accepted) connections in 2 s, \(after.refused - before.refused) refused, reconnects \(reconnectsBefore) then \(reconnectsAfter)"
            )
            // The fixture's redial interval is 20 ms: at most 100 dials in 2 s, and some slack.
            #expect(accepted <= 120, "at most one dial per redial interval: \(accepted) in 2 s")
            #expect(reconnectsAfter == reconnectsBefore, "refused, never connected")
            // (Refusals are counted when the handshake ends: one accepted at the window's edge
            // may be refused after it.)
            #expect(after.refused - before.refused + 1 >= accepted, "every one refused")
            // One line per cause: the refusal, and whatever the host's absence looked like before.
            let warnings = daemon.log.split(separator: "\n").filter { $0.contains("stream dial failed") && $0.contains("process=gave-up ") }
            #expect(warnings.filter { $0.contains("unknown stream") }.count == 1, "\(warnings)")
            #expect(warnings.count <= DialFailureReport.causesTold, "\(warnings)")

            // The process is intact: its stdin is still open (the broker keeps it for a host
            // that may register the stream again), and a signal still reaches it.
            #expect(exits.count("gave-up") == 0)
            let process = try await daemon.bridge.list().processes.first { $0.id == "gave-up" }
            #expect(process?.state == .running)
            try await daemon.bridge.signal("gave-up", SIGTERM)
            try await eventually("its exit") { exits.count("gave-up") == 1 }
            #expect(await output.value == bytes("before the host gave up\n"))
            #expect(try await daemon.stop() == .exited(0))
        }
    }
}
