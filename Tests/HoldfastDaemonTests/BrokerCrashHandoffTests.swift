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

/// Issue 16 for a process a runtime hands over on the public handoff socket: the broker deposits
/// copies of its fds with the supervisor, so every broker started after a crash is handed the
/// process again — its streams resume exactly once, and the runtime that handed it over still
/// manages it.
@Suite("A handoff peer's process survives broker crashes", .timeLimit(.minutes(5)))
struct BrokerCrashHandoffTests {
    static let kills = 20

    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        arguments: HandoffSharedDescriptionTests.Transport.allCases)
    func aProcessHandedOverOnTheHandoffSocketResumesAfterEveryCrash(transport: HandoffSharedDescriptionTests.Transport) async throws {
        let daemon = try await DaemonFixture(brokerRestartBackoffMax: "200ms")
        defer { daemon.cleanUp() }
        let processes = TestProcesses()
        defer { processes.killAll() }
        let output = try daemon.streams.open(token: bytes("h-out"), direction: .receive)
        let input = try daemon.streams.open(token: bytes("h-in"), direction: .send)
        let received = collect(output)
        let copy = daemon.directory.file("stdin.copy")
        // The runtime's process: a counter on stdout and `cat` copying stdin, its pipes ours.
        let (outPipe, inPipe) = (try transport.make(), try transport.make())
        let pid = try processes.start(
            ["sh", "-c", "exec 3<&0; cat <&3 > \(copy) & exec 3<&-; i=0; while :; do i=$((i+1)); echo h $i || exit 3; [ $((i % 50)) -ne 0 ] || sleep 0.02; done"],
            stdin: inPipe.read, stdout: outPipe.write)
        close(outPipe.write)
        close(inPipe.read)

        // Handed over as a runtime does: over broker.sock, as a uid the daemon allows (root).
        try await daemon.handOver("handed", [(.stdout, "h-out"), (.stdin, "h-in")], descriptors: [outPipe.read, inPipe.write])
        try await eventually("the deposit kept", timeout: .seconds(20)) { daemon.log.contains("keeping a handoff process's fds") }

        let typist = NumberedTypist { try await input.send($0) }
        let brokers = try await killBroker(of: daemon, times: Self.kills, pause: 50...300) { broker in
            try await eventually("the handoff process handed to broker \(broker)", timeout: .seconds(20)) {
                try await daemon.brokerStreams().filter { $0.process == "handed" }.count == 2
            }
        }
        try await Task.sleep(for: .milliseconds(300))
        let sent = await typist.stop()
        #expect(await input.finish() == 0, "every stdin byte acknowledged")
        #expect(kill(pid, 0) == 0, "the process lives: no SIGPIPE, no write error")

        // The runtime that handed it over still manages it, through the last broker: it ends
        // the process, reports the exit, and the output drains.
        let runtimeNow = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        kill(pid, SIGTERM)
        #expect(try await processes.wait(pid) == .signaled(SIGTERM))
        let exited = BrokerRequest.processExited(ProcessExitedRequest(process: "handed"))
        _ = try await runtimeNow.request(exited.frameType, body: exited.body)
        let data = try await withTimeout("the output", .seconds(60)) { await received.value }

        let numbers = EveryKindOfStream.numbers(data, prefix: "h")
        let last = try #require(numbers.last)
        let lost = output.statistics.lost
        #expect(matchesAcrossGaps(data, all: expectedLines(last, prefix: "h"), gaps: lost.ranges), "stdout: \(data.count) bytes, lost \(lost.summary)")
        try await eventually("cat's copy complete", timeout: .seconds(20)) { (readFile(copy) ?? []).count >= sent.count }
        // The last broker's take-over lines are in the file once its line for the process's
        // streams, logged after them through the same writer thread, is.
        try await daemon.waitForLog("resumed streams the previous broker held pid=\(brokers.last!) process=handed ")
        let repeats = inputRepeats(in: daemon.log, process: "handed")
        #expect(matches(readFile(copy) ?? [], sent: sent, repeats: repeats), "stdin exact but for logged repeats \(repeats)")
        // A handed-over socket takes no stage (it is never spliced into): a kill inside a write
        // of its stdin is reported as possibly repeated, never lost unseen.
        #expect(lost.bytes == 0 && (transport == .socketPair || repeats.isEmpty), "the windows the broker made settle every interrupted take: \(lost.summary), \(repeats)")
        // Gone from the broker, the supervisor let go of its copies too.
        try await eventually("the deposit released", timeout: .seconds(20)) {
            try await daemon.brokerStreams().allSatisfy { $0.process != "handed" }
        }
        print("handoff process (\(transport)), \(Self.kills) broker kills: stdout \(data.count) bytes, \(lost.bytes) lost; stdin \(sent.count) bytes, \(repeats.count) possible repeats")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A runtime that asks about its processes right after a broker crash (its connection
    /// waiting in the socket's backlog while the broker restarts) is answered only once every
    /// process is back with the new broker (`open-handoff`): it finds all of them, never a
    /// `no-such-process` for one the supervisor was about to hand back. Twelve processes: two
    /// batches of the hand-back.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aRuntimeAskingRightAfterACrashFindsEveryProcess() async throws {
        let daemon = try await DaemonFixture(brokerRestartBackoffMax: "200ms")
        defer { daemon.cleanUp() }
        let ids = (0..<12).map { "q\(String(format: "%02d", $0))" }
        var writers: [Int32] = []
        defer { for fd in writers { close(fd) } }
        let runtime = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        for id in ids {
            _ = try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive)
            let pipe = try PipeEnds.make()
            writers.append(pipe.write)
            try await daemon.handOver(id, [(.stdout, "\(id)-out")], descriptors: [pipe.read], on: runtime)
        }
        try await eventually("every deposit kept", timeout: .seconds(20)) {
            daemon.log.components(separatedBy: "keeping a handoff process's fds").count - 1 == ids.count
        }
        let broker = try #require(try await daemon.rolePID("broker"))
        kill(broker, SIGKILL)
        // As soon as it is gone (and reaped: no longer accepting), before the next one starts
        // (after 100 ms): the connection waits for the next broker, and is its first.
        try await eventually("the broker gone", timeout: .seconds(10)) { kill(broker, 0) != 0 }
        let asking = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        let list = BrokerRequest.list(ListRequest())
        let reply = try await asking.request(list.frameType, body: list.body)
        let listed = try ControlJSON.decode(ListResponse.self, from: reply.frame.body, frameType: reply.frame.type)
        #expect(Set(listed.streams.map(\.process)) == Set(ids), "every process listed by the next broker: \(listed.streams.map(\.process))")
        let release = BrokerRequest.release(process: ids.last!)
        let released = try await asking.request(release.frameType, body: release.body)
        #expect(released.descriptors.count == 1)
        for fd in released.descriptors { close(fd) }
        #expect(try await daemon.rolePID("broker") != broker)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// The runtime says its process exited (`process-exited`, answered at once) and the broker
    /// dies before the drain is done: the next broker is handed the process and told it exited
    /// too, so it drains it and lets it go. Before, it relayed the process for good (the
    /// runtime, answered, never says it again) and the supervisor kept its copies.
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the broker dies at a failpoint, which only debug builds have"))
    func aProcessExitedTheBrokerDiesAfterIsDrainedByTheNextOne() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.brokerExitMarked):ex"], brokerRestartBackoffMax: "200ms")
        defer { daemon.cleanUp() }
        let received = collect(try daemon.streams.open(token: bytes("ex-out"), direction: .receive))
        let pipe = try PipeEnds.make()
        let target = linkTarget("/proc/self/fd/\(pipe.read)")
        let runtime = try await daemon.handOver("ex", [(.stdout, "ex-out")], descriptors: [pipe.read])
        try await eventually("the deposit kept", timeout: .seconds(20)) { daemon.log.contains("keeping a handoff process's fds") }
        // What the process wrote before it exited; its end closed (it is gone).
        var random = SeededRandom(seed: 0xE417)
        let written = (0..<(48 * 1024)).map { _ in UInt8.random(in: 0...255, using: &random) }
        #expect(written.withUnsafeBytes { write(pipe.write, $0.baseAddress, $0.count) } == written.count)
        close(pipe.write)
        let firstBroker = try await daemon.rolePID("broker")

        let exited = BrokerRequest.processExited(ProcessExitedRequest(process: "ex"))
        do {
            _ = try await runtime.request(exited.frameType, body: exited.body)
            Issue.record("answered although the broker was to die first")
        } catch {
            #expect(error.code == .channelClosed, "\(error)")
        }
        let data = try await withTimeout("the output to its end", .seconds(30)) { await received.value }
        #expect(sha256Hex(data) == sha256Hex(written), "every byte once, then END: \(data.count) of \(written.count)")
        try await eventually("the next broker", timeout: .seconds(30)) {
            let broker = try await daemon.rolePID("broker")
            return broker != nil && broker != firstBroker
        }
        // Drained and let go by the next broker: gone from it, and the supervisor's copy closed.
        try await eventually("the process gone from the next broker", timeout: .seconds(30)) {
            try await daemon.brokerStreams().allSatisfy { $0.process != "ex" }
        }
        do {
            try await eventually("the supervisor's copy closed", timeout: .seconds(20)) {
                !holders(of: target).contains { $0.hasPrefix("\(daemon.daemonPID) ") }
            }
        } catch {
            // Once in a loaded full run (beside a fresh clone's build), not reproduced alone: the
            // daemon's own account, for the next time.
            Issue.record("\(error); holders: \(holders(of: target))\n\(daemon.log.suffix(8000))")
            throw error
        }
        try await eventually("the drain logged") { daemon.log.contains("process streams drained") && daemon.log.contains("process=ex") }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A handoff peer cannot claim what only the supervisor may say: a process's owner (to
    /// manage another peer's process after a crash), a checkpoint slot (to write over another
    /// stream's progress) or `resume`. Each is refused with permission-denied, changes nothing,
    /// and a process streaming meanwhile is untouched.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aHandoffPeerCannotNameAnOwnerASlotAResumeOrAnEnding() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let victim = collect(try daemon.streams.open(token: bytes("v-out"), direction: .receive))
        _ = try await daemon.launch(ProcessSpec(id: "v", argv: counterCommand(200, prefix: "v", pause: "0.005"), stdout: daemon.spec("v-out")))
        let peer = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        let spec = daemon.spec("x-out")
        let stream = StreamDescription(kind: .stdout, fd: 0, address: spec.address, mode: .resumable, token: "x-out", secret: spec.secret)
        var slot = stream
        slot.checkpoint = 0
        var resume = stream
        resume.resume = true
        var ended = stream
        ended.ended = true
        let attempts = [
            ("an owner", AdoptRequest(process: "x", streams: [stream], handoffOwner: 12345)),
            ("a checkpoint slot", AdoptRequest(process: "x", streams: [slot])),
            ("a resume", AdoptRequest(process: "x", streams: [resume])),
            ("an ended input", AdoptRequest(process: "x", streams: [ended])),
            ("an ending input", AdoptRequest(process: "x", streams: [stream], endingInput: true)),
            // Its fds would be kept unrelayed and handed to whoever releases "x" as that uid.
            ("a release to keep", AdoptRequest(process: "x", streams: [stream], releasing: true)),
        ]
        for (what, request) in attempts {
            let pipe = try PipeEnds.make()
            defer { close(pipe.write) }
            let adopt = BrokerRequest.adopt(request)
            do {
                _ = try await peer.request(adopt.frameType, body: adopt.body, descriptors: [pipe.read])
                Issue.record("a handoff peer named \(what) and was obeyed")
            } catch {
                #expect(error.code == .permissionDenied, "\(what): \(error)")
            }
            close(pipe.read)
        }
        // Nor may it open the handoff socket of a broker the supervisor is still handing back to.
        do {
            _ = try await peer.call(BrokerRequest.openHandoff, reply: [String: String].self)
            Issue.record("a handoff peer sent open-handoff and was obeyed")
        } catch {
            #expect(error.code == .permissionDenied, "open-handoff: \(error)")
        }
        #expect(try await daemon.brokerStreams().allSatisfy { $0.process != "x" }, "nothing adopted")
        #expect(!daemon.log.contains("keeping a handoff process's fds"), "nothing deposited")
        let report = try await daemon.wait("v")
        #expect(report.exitCode == 0)
        #expect(await victim.value == expectedLines(200, prefix: "v"), "the victim's output, exact")
        #expect(try await daemon.stop() == .exited(0))
    }
}
