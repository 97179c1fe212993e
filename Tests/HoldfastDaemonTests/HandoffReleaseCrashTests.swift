import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A runtime takes its process's stdio back (`release`) and the broker dies inside the release:
/// before its answer with the fds was written, or after it but before the supervisor let go of
/// its copies. Neither may leave the process's pipes with no holder (its next write a SIGPIPE,
/// its stdin a false end-of-file), nor relayed by the next broker while the runtime reads them
/// too. The next broker keeps the fds, unrelayed: the runtime's next `release` gets them, or,
/// if none comes (it had them), they close after `handoff.release_kept_for`.
@Suite("A release the broker dies inside loses no pipe", .timeLimit(.minutes(5)))
struct HandoffReleaseCrashTests {
    enum Moment: String, CaseIterable, Sendable, CustomTestStringConvertible {
        case beforeTheAnswer, afterTheAnswer

        var failpoint: String { self == .beforeTheAnswer ? Failpoint.brokerReleaseMarked : Failpoint.brokerReleaseAnswered }
        var testDescription: String { rawValue }
    }

    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the broker dies at a failpoint, which only debug builds have"),
        arguments: Moment.allCases)
    func aReleaseTheBrokerDiesInsideLeavesEveryPipeHeld(moment: Moment) async throws {
        let daemon = try await DaemonFixture(
            extraConfig: "handoff:\n  release_kept_for: 15s\nmetrics:\n  address: \"unix:{run}/metrics.sock\"", environment: ["HOLDFAST_FAILPOINT": "\(moment.failpoint):rel"],
            brokerRestartBackoffMax: "200ms")
        defer { daemon.cleanUp() }
        let processes = TestProcesses()
        defer { processes.killAll() }
        let received = collect(try daemon.streams.open(token: bytes("r-out"), direction: .receive))
        let input = try daemon.streams.open(token: bytes("r-in"), direction: .send)
        let copy = daemon.directory.file("stdin.copy")
        let (outPipe, inPipe) = (try PipeEnds.make(), try PipeEnds.make())
        let pid = try processes.start(
            ["sh", "-c", "exec 3<&0; (cat <&3 > \(copy); echo > \(copy).ended) & exec 3<&-; i=0; while :; do i=$((i+1)); echo r $i || exit 3; sleep 0.005; done"],
            stdin: inPipe.read, stdout: outPipe.write)
        // Its subshell and `cat` are in its process group (it leads a session of its own): a
        // test that fails halfway ends them too, not only the shell.
        // Only while the shell is unreaped: its number (and so its group's) is then still its
        // own. After the wait below the kernel may give it to another test's process.
        var reaped = false
        defer { if !reaped { kill(-pid, SIGKILL) } }
        close(outPipe.write)
        close(inPipe.read)
        let pipes = [linkTarget("/proc/self/fd/\(outPipe.read)"), linkTarget("/proc/self/fd/\(inPipe.write)")]

        let runtime = try await daemon.handOver("rel", [(.stdout, "r-out"), (.stdin, "r-in")], descriptors: [outPipe.read, inPipe.write])
        try await eventually("the deposit kept", timeout: .seconds(20)) { daemon.log.contains("keeping a handoff process's fds") }
        // (Not ended: an END would close the process's stdin, with nothing left to release.)
        try await input.send(bytes("before the release\n"))
        try await eventually("the host's stdin bytes copied", timeout: .seconds(20)) {
            String(decoding: readFile(copy) ?? [], as: UTF8.self) == "before the release\n"
        }
        try await eventually("the output relayed", timeout: .seconds(20)) {
            try await daemon.brokerStreams().contains { $0.process == "rel" && $0.kind == .stdout && $0.bytesToHost > 100 }
        }
        let firstBroker = try #require(try await daemon.rolePID("broker"))

        // The release the broker dies inside.
        let release = BrokerRequest.release(process: "rel")
        var returned: [Int32] = []
        switch moment {
        case .beforeTheAnswer:
            do {
                let reply = try await runtime.request(release.frameType, body: release.body)
                returned = reply.descriptors
                Issue.record("answered although the broker was to die before its answer")
            } catch {
                #expect(error.code == .channelClosed, "\(error)")
            }
        case .afterTheAnswer:
            let reply = try await runtime.request(release.frameType, body: release.body)
            returned = reply.descriptors
            let streams = try ControlJSON.decode(ReleaseResponse.self, from: reply.frame.body, frameType: reply.frame.type).streams
            #expect(streams.map(\.kind) == [.stdout, .stdin] && returned.count == 2, "\(streams)")
        }
        try await eventually("a broker after the one that died", timeout: .seconds(30)) {
            let broker = try await daemon.rolePID("broker")
            return broker != nil && broker != firstBroker
        }
        try await eventually("the process handed to the next broker", timeout: .seconds(20)) { daemon.log.contains("handed to the restarted broker") }
        do {
            try await daemon.waitForLog("a release a broker crash interrupted handed to the restarted broker to keep for its peer")
        } catch {
            // Seen once in a loaded full run, not reproduced since: the log says which way it went.
            Issue.record("the kept release was not handed over: the daemon's log ends\n\(daemon.log.suffix(8000))")
            throw error
        }
        // Kept, not relayed: nothing of it streams (the runtime may be reading these pipes).
        // (A loaded broker may miss `status`'s 2 s bound for its list, which then shows no
        // streams: asked until it answers. A relayed stream is never `kept`.)
        try await eventually("the kept streams shown", timeout: .seconds(20)) {
            try await daemon.brokerStreams().filter { $0.process == "rel" }.map(\.state) == [.kept, .kept]
        }
        let shown = try await daemon.brokerStreams().filter { $0.process == "rel" }
        #expect(shown.allSatisfy { $0.state == .kept && $0.bytesToHost == 0 }, "not relayed by the next broker, shown kept: \(shown)")
        // Its runtime (one that restarted, say) sees what waits for it: `list` on the handoff socket.
        let listed = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        let streams = try await listed.call(BrokerRequest.list(ListRequest()), reply: ListResponse.self).streams
        listed.close()
        #expect(streams.filter { $0.process == "rel" }.map(\.kind) == [.stdout, .stdin] && streams.allSatisfy { $0.state == .kept }, "\(streams)")
        #expect(kill(pid, 0) == 0, "the process lives")
        // Held by the supervisor meanwhile (its copies; the broker, not dumpable, cannot be
        // looked into: that it let go shows below, as the stdin's end-of-file).
        func heldBySupervisor(_ pipe: String) -> Bool { holders(of: pipe).contains { $0.hasPrefix("\(daemon.daemonPID) ") } }
        #expect(pipes.allSatisfy(heldBySupervisor), "\(pipes.map { holders(of: $0) })")
        func keptReleases() async throws -> Double? {
            parsePrometheus(try await httpExchange(
                .unix(path: daemon.directory.file("metrics.sock")), "GET /metrics HTTP/1.1\r\nHost: guest\r\n\r\n"))["holdfast_broker_kept_releases"]
        }
        #expect(try await keptReleases() == 1, "counted while kept")

        switch moment {
        case .beforeTheAnswer:
            // The runtime got no answer: it asks again, of the broker that runs now.
            let again = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
            let reply = try await again.request(release.frameType, body: release.body)
            returned = reply.descriptors
            let streams = try ControlJSON.decode(ReleaseResponse.self, from: reply.frame.body, frameType: reply.frame.type).streams
            #expect(streams.map(\.kind) == [.stdout, .stdin] && returned.count == 2, "\(streams)")
            #expect(streams.allSatisfy { $0.window == nil && $0.resume == nil }, "\(streams)")
            // The broker's log reaches the daemon's log by way of the supervisor: after the answer.
            try await eventually("the broker says it handed the kept release over", timeout: .seconds(10)) {
                daemon.log.contains("a release kept for its peer handed over")
            }
        case .afterTheAnswer:
            // It had them: nobody asks, and they close when the time kept is up. (15 s: the
            // checks above ask the broker and the metrics endpoint, and on a loaded machine a
            // shorter time ran out before they were done — 3 s did, in 2 of 3 loaded runs.)
            try await eventually("the kept fds closed", timeout: .seconds(40)) {
                daemon.log.contains("no release came for a process's kept fds: closed")
            }
        }
        // The supervisor's copies are gone.
        try await eventually("the supervisor's copies closed", timeout: .seconds(20)) { !pipes.contains(where: heldBySupervisor) }
        #expect(returned.map { linkTarget("/proc/self/fd/\($0)") } == pipes, "the same pipes came back")
        #expect(try await keptReleases() == 0, "none kept after")
        #expect(try await daemon.brokerStreams().allSatisfy { $0.process != "rel" }, "nor shown")

        // The process wrote on into the pipe all along, and goes on: its lines are consecutive.
        let lines = try await readLines(returned[0], atLeast: 50)
        let numbers = EveryKindOfStream.numbers(bytes(lines.joined()), prefix: "r")
        #expect(numbers.count >= 50 && numbers == Array(numbers[0]...numbers[0] + numbers.count - 1), "\(numbers.prefix(5))…")
        // Its stdin is ours: what we write reaches it, and our close is its end-of-file (no
        // other holder, the broker's kept fds included, keeps it open), so `cat` finishes.
        #expect(write(returned[1], "after the release\n", 18) == 18)
        close(returned[1])
        try await eventually("cat's copy complete", timeout: .seconds(20)) {
            String(decoding: readFile(copy) ?? [], as: UTF8.self) == "before the release\nafter the release\n"
        }
        try await eventually("cat ended by the end-of-file", timeout: .seconds(20)) { readFile(copy + ".ended") != nil }
        #expect(kill(pid, 0) == 0, "no SIGPIPE, no write error: the process lives")
        kill(pid, SIGTERM)
        #expect(try await processes.wait(pid) == .signaled(SIGTERM))
        reaped = true
        close(returned[0])
        _ = received
        print("release interrupted \(moment.rawValue): pipes held throughout, \(numbers.count) lines read after it, consecutive")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A process printing "PREFIX N" lines every 5 ms on a pipe handed over as its stdout (process
    /// `id`, host token "PREFIX-out"), once the host has its first lines: its pid (it leads a
    /// session of its own: the caller ends its group), the pipe, and the runtime's connection.
    func handOverAPrinter(
        _ daemon: DaemonFixture, _ processes: TestProcesses, id: String, prefix: String
    ) async throws -> (pid: pid_t, pipe: String, runtime: ControlClient) {
        _ = collect(try daemon.streams.open(token: bytes("\(prefix)-out"), direction: .receive))
        let out = try PipeEnds.make()
        let pid = try processes.start(
            ["sh", "-c", "i=0; while :; do i=$((i+1)); echo \(prefix) $i || exit 3; sleep 0.005; done"], stdout: out.write)
        close(out.write)
        let pipe = linkTarget("/proc/self/fd/\(out.read)")
        let runtime = try await daemon.handOver(id, [(.stdout, "\(prefix)-out")], descriptors: [out.read])
        try await eventually("the output relayed", timeout: .seconds(20)) {
            try await daemon.brokerStreams().contains { $0.process == id && $0.bytesToHost > 100 }
        }
        return (pid, pipe, runtime)
    }

    /// Reads lines from a non-blocking `fd` until `atLeast` complete ones came (10 s at most).
    func readLines(_ fd: Int32, atLeast count: Int) async throws -> [String] {
        var text: [UInt8] = []
        let deadline = ContinuousClock.now + .seconds(10)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while text.filter({ $0 == 10 }).count < count + 1, ContinuousClock.now < deadline {
            var ready = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&ready, 1, 100) > 0 else { continue }
            let got = read(fd, &buffer, buffer.count)
            if got > 0 { text += buffer[..<got] } else if got == 0 { break }
        }
        // The first line may be a tail the broker's last read cut: from the first whole one on.
        let lines = String(decoding: text, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).map { String($0) + "\n" }
        return Array(lines.dropFirst().dropLast())
    }
}

extension HandoffReleaseCrashTests {
    /// A runtime that asks for a release and is gone before the answer (it crashed, or gave up
    /// waiting): the broker cannot write the answer, and closing the fds would leave the
    /// process's pipes to nobody. They are kept, unrelayed and shown `kept`, for the runtime's
    /// next `release` on a new connection, which gets the same pipe; the process writes on.
    ///
    /// In a process of its own: any other test's fork in this process between our close of the
    /// release's connection and the broker's answer holds a copy of that socket until its exec
    /// (close-on-exec closes it only there), and the answer then goes into it — delivered, as
    /// far as the broker can tell, so nothing is kept (a full suite under load failed so).
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aRuntimeThatLeavesInsideItsReleaseFindsTheFdsKept() async throws {
        guard try await isolated("aRuntimeThatLeavesInsideItsReleaseFindsTheFdsKept", timeout: .seconds(120)) else { return }
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let processes = TestProcesses()
        defer { processes.killAll() }
        let (pid, pipe, runtime) = try await handOverAPrinter(daemon, processes, id: "gone", prefix: "g")
        defer { kill(-pid, SIGKILL) }

        runtime.close()
        // The release is sent on a connection of its own, closed before the broker can read it:
        // the broker is stopped meanwhile (SIGSTOP; the connection waits in the listener's
        // backlog, the request in its queue), so its answer finds nobody, whatever the load.
        let release = BrokerRequest.release(process: "gone")
        let broker = try #require(try await daemon.rolePID("broker"))
        kill(broker, SIGSTOP)
        do {
            // The stop is the kernel's to finish: a broker thread still running could answer
            // before the connection is closed (seen once in 13 runs under three busy loops: the
            // answer delivered, nothing kept).
            try await eventually("the broker's every thread stopped", timeout: .seconds(5)) { everyThreadStopped(broker) }
            let connection = try await Dialer.connect(to: .unix(path: daemon.directory.file("broker.sock")), kind: .seqpacket, timeout: .seconds(5))
            let fd = try #require(connection.detach())
            let frame = release.frame(id: 1).encoded
            #expect(frame.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) } == frame.count)
            close(fd)
        } catch {
            kill(broker, SIGCONT)
            throw error
        }
        kill(broker, SIGCONT)
        do {
            try await daemon.waitForLog("a release's answer did not reach its peer: its fds are kept for the peer's next release")
        } catch {
            Issue.record("the daemon's log ends\n\(daemon.log.suffix(6000))")
            throw error
        }
        try await eventually("the kept stream shown", timeout: .seconds(20)) {
            try await daemon.brokerStreams().filter { $0.process == "gone" }.map(\.state) == [.kept]
        }
        #expect(kill(pid, 0) == 0, "the process lives (its pipe has a holder: no SIGPIPE)")

        // Its next release, on a new connection: the same pipe.
        let again = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        defer { again.close() }
        let reply = try await again.request(release.frameType, body: release.body)
        let streams = try ControlJSON.decode(ReleaseResponse.self, from: reply.frame.body, frameType: reply.frame.type).streams
        #expect(streams.map(\.kind) == [.stdout] && reply.descriptors.count == 1, "\(streams)")
        #expect(reply.descriptors.map { linkTarget("/proc/self/fd/\($0)") } == [pipe], "the same pipe came back")
        try await daemon.waitForLog("a release kept for its peer handed over")
        #expect(try await daemon.brokerStreams().allSatisfy { $0.process != "gone" }, "nothing kept after")
        let lines = try await readLines(reply.descriptors[0], atLeast: 20)
        let numbers = EveryKindOfStream.numbers(bytes(lines.joined()), prefix: "g")
        #expect(numbers.count >= 20 && numbers == Array(numbers[0]...numbers[0] + numbers.count - 1), "the process wrote on: \(numbers.prefix(5))…")
        #expect(try await daemon.stop() == .exited(0))
    }
}

extension HandoffReleaseCrashTests {
    /// A runtime that got its release's answer, the broker killed right after it, then hands the
    /// same process over again while the next broker keeps that release for it: the kept copies
    /// are of the very pipes it hands over, so they let go and the adopt goes on (before, it was
    /// refused `process-exists` until the runtime asked for fds it already had, or the time kept
    /// ran out). Other pipes under the id are still refused: the kept ones may be all the
    /// process's pipes have.
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the broker dies at a failpoint, which only debug builds have"))
    func theSamePipesHandedOverAgainLetAKeptReleaseGo() async throws {
        let daemon = try await DaemonFixture(
            extraConfig: "handoff:\n  release_kept_for: 120s", environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.brokerReleaseAnswered):back"],
            brokerRestartBackoffMax: "200ms")
        defer { daemon.cleanUp() }
        let processes = TestProcesses()
        defer { processes.killAll() }
        let (pid, pipe, runtime) = try await handOverAPrinter(daemon, processes, id: "back", prefix: "b")
        defer { kill(-pid, SIGKILL) }
        defer { runtime.close() }
        let firstBroker = try #require(try await daemon.rolePID("broker"))
        let release = BrokerRequest.release(process: "back")
        let reply = try await runtime.request(release.frameType, body: release.body)
        let returned = try #require(reply.descriptors.first)
        var returnedOpen = reply.descriptors
        defer { for fd in returnedOpen { close(fd) } }
        #expect(linkTarget("/proc/self/fd/\(returned)") == pipe)
        try await eventually("a broker after the one that died", timeout: .seconds(30)) {
            let broker = try await daemon.rolePID("broker")
            return broker != nil && broker != firstBroker
        }
        try await daemon.waitForLog("a release a broker crash interrupted handed to the restarted broker to keep for its peer")
        try await eventually("the kept stream shown", timeout: .seconds(20)) {
            try await daemon.brokerStreams().filter { $0.process == "back" }.map(\.state) == [.kept]
        }

        // Another pipe under the id: refused, and the release stays kept.
        let other = try PipeEnds.make()
        defer { close(other.write) }
        do {
            _ = try await daemon.handOver("back", [(.stdout, "b2-out")], descriptors: [other.read])
            Issue.record("another pipe was adopted under the id of a kept release")
        } catch {
            #expect((error as? HoldfastError)?.code == .processExists, "\(error)")
        }
        #expect(try await daemon.brokerStreams().filter { $0.process == "back" }.map(\.state) == [.kept])

        // The same pipe: the kept release lets go and the process is adopted, crash-survival and all.
        let again = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        defer { again.close() }
        let received = accumulate(try daemon.streams.open(token: bytes("b2-out"), direction: .receive))
        let spec = daemon.spec("b2-out")
        let adopt = BrokerRequest.adopt(AdoptRequest(process: "back", streams: [
            StreamDescription(kind: .stdout, fd: 0, address: spec.address, mode: .resumable, token: spec.token, secret: spec.secret)
        ]))
        let answer = try await again.call(adopt, descriptors: [dup(returned)], reply: AdoptResponse.self)
        #expect(answer.survivesBrokerCrash, "\(answer)")
        try await daemon.waitForLog("a release kept for its peer let go: the peer hands the same pipes over again")
        try await eventually("relayed again, nothing kept", timeout: .seconds(20)) {
            try await daemon.brokerStreams().filter { $0.process == "back" }.map(\.state) == [.connected]
        }
        // The deposit's copies are kept on the supervisor's side after the broker answered the
        // runtime: waited for (read at once, a full suite under load found the line not yet written).
        try await eventually("the supervisor keeps the new adoption's copies", timeout: .seconds(20)) {
            daemon.log.components(separatedBy: "keeping a handoff process's fds").count - 1 == 2
        }
        // The stream carries the process's lines on, consecutive, once the runtime stops reading
        // its own copy (closed here).
        for fd in returnedOpen { close(fd) }
        returnedOpen = []
        try await eventually("lines at the host", timeout: .seconds(20)) {
            EveryKindOfStream.numbers(received.bytes, prefix: "b").count >= 50
        }
        let numbers = EveryKindOfStream.numbers(received.bytes, prefix: "b")
        #expect(numbers == Array(numbers[0]...numbers[0] + numbers.count - 1), "\(numbers.prefix(5))…")
        #expect(kill(pid, 0) == 0, "the process lives")
        #expect(try await daemon.stop() == .exited(0))
    }
}
