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
            let logBefore = daemon.log.utf8.count
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
            // may be refused after it, and on a starved machine several: their ends are waited
            // for. That none connected is the reconnect count's to say, above.)
            try? await eventually("the window's handshakes ended", timeout: .seconds(10)) {
                daemon.streams.statistics.refused - before.refused + 1 >= accepted
            }
            #expect(daemon.streams.statistics.refused - before.refused + 1 >= accepted, "every one refused")
            // One line per cause: the refusal, and whatever the host's absence looked like before —
            // of this stdin, since it was last connected (a loaded machine's first dial of a
            // stream can fail too, and another cause is told then: a fifth line, counted before).
            // (The broker's lines reach the file through its log's writer thread: the refusal's
            // is waited for before they are counted.)
            func stdinWarnings() -> [Substring] {
                let sinceTheHostLeft = String(decoding: Array(daemon.log.utf8.dropFirst(logBefore)), as: UTF8.self)
                return sinceTheHostLeft.split(separator: "\n").filter {
                    $0.contains("stream dial failed") && $0.contains("process=gave-up ") && $0.hasSuffix("stream=stdin")
                }
            }
            try await eventually("the refusal's line in the log") { stdinWarnings().contains { $0.contains("unknown stream") } }
            let warnings = stdinWarnings()
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

    /// Found by the soak (RELIABILITY.md): a host application closes an output stream once it
    /// has its END (done with it), and the broker is killed before it let the process go (here
    /// the process closed its stdout and lives on). The successor resumes the stdout at its END
    /// and dials to deliver the END again: every dial refused `unknown stream`. It redialled
    /// until the drain timeout (300 s here), and the process's exit report waited as long. Now a
    /// second of such refusals ends the stream, nothing undelivered, and the exit comes at once.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func anOutputTheHostClosedAtItsEndIsLetGoByTheSuccessorAfterASecond() async throws {
        try await withBridgeDaemon(drainTimeout: "300s") { daemon, exits in
            let done = daemon.directory.file("done")
            let host = try daemon.streams.open(token: bytes("closed-out"), direction: .receive)
            let output = collect(host)
            _ = try await daemon.bridge.create(ProcessSpec(
                id: "closed", argv: ["sh", "-c", "echo 'all of it'; exec >&-; while [ ! -e \(done) ]; do sleep 0.05; done"],
                stdout: daemon.spec("closed-out")))
            let received = try await withTimeout("the stdout and its END", .seconds(20)) { await output.value }
            #expect(received == bytes("all of it\n"))
            // The application is done with the stream, as the host library's own processes are
            // at END: its echo delivered, then closed. The host no longer knows it.
            #expect(await host.closeAfterEndDelivered(timeout: .seconds(10)), "the broker has the END echo")
            daemon.streams.close(token: bytes("closed-out"))

            let broker = try #require(try await daemon.rolePID("broker"))
            let killedBroker = ProcessIdentity(broker)
            kill(broker, SIGKILL)
            try await eventually("a new broker") { try await daemon.roleIsAnother("broker", than: killedBroker) }
            try await eventually("the successor resumed the stdout") { daemon.log.contains("resumed streams the previous broker held") }
            // At its END, every byte acknowledged: the echo said so, and the checkpoint kept it.
            let resumed = daemon.log.split(separator: "\n").filter { $0.contains("stream resumed from its checkpoint") }
            #expect(resumed.count == 1 && resumed[0].contains("acknowledged=10 offset=10"), "\(resumed)")
            try await eventually("the successor refused as an unknown stream") { daemon.log.contains("unknown stream") }
            try writeFile(done, [])
            let asked = ContinuousClock.now
            do {
                try await eventually("the exit (the drain timeout is 300 s)", timeout: .seconds(20)) { exits.count("closed") == 1 }
            } catch {
                Issue.record("no exit: the daemon's log ends\n\(daemon.log.suffix(6000))")
                throw error
            }
            print("an output the host closed at its END: the exit \(ContinuousClock.now - asked) after the process was let end")
            let report = exits.all.first { $0.id == "closed" }
            #expect(report?.exitCode == 0 && report?.undelivered == 0 && report?.outputCutShort == nil, "\(String(describing: report))")
            try await eventually("no stream left in the broker") { (try? await daemon.bridge.stats(timeout: .seconds(5)))?.liveStreamObjects == 0 }
            #expect(try await daemon.stop() == .exited(0))
        }
    }
}
