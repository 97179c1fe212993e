import CHoldfastTestShims
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import HoldfastTools
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
            try await Self.adopt(process, token, fd, on: daemon)
        }
        #expect(try await adopt("kept", "k-out", keptPipe.read) == AdoptResponse(survivesBrokerCrash: true))
        let unkept = try await adopt("unkept", "u-out", unkeptPipe.read)
        #expect(!unkept.survivesBrokerCrash && unkept.reason?.contains("no free checkpoint slots") == true, "\(unkept)")
        try await daemon.waitForLog("a handoff process is adopted without surviving a broker crash")
        let warned = daemon.log.split(separator: "\n").filter { $0.contains("without surviving a broker crash") }
        #expect(warned.count == 1 && warned[0].contains("process=unkept") && warned[0].contains("no free checkpoint slots"), "\(warned)")
        // And `status` says so, for the operator: the field on its streams, a line under the table.
        let report = try await daemon.statusTheBrokerAnswered()
        let survival = Dictionary(grouping: report.streams, by: \.process).mapValues { $0.map(\.survivesBrokerCrash) }
        #expect(survival["unkept"] == [false] && survival["kept"] == [nil], "\(survival)")
        let rendered = StatusPrinter.render(report, colour: false).split(separator: "\n")
        let unkeptLines = rendered.filter { $0.contains("not kept for a broker crash") }
        #expect(unkeptLines.count == 1 && unkeptLines[0].hasPrefix("unkept: "), "\(rendered)")

        // Relayed all the same: what it writes reaches the host, exact.
        try await Self.expectRelayedExact(unkeptPipe, to: unkeptOutput, seed: 0x5A7E)

        // And what each answer said holds: after a crash the next broker has the one, not the other.
        let processes = try await Self.processesAfterABrokerCrash(daemon)
        #expect(processes == ["kept"], "the kept process is back, the unkept one is gone: \(processes)\n\(daemon.log.suffix(6000))")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A runtime's `adopt` of a process with one resumable stdout on `fd` (closed after: the
    /// broker has its own copy), and the answer.
    static func adopt(_ process: String, _ token: String, _ fd: Int32, on daemon: DaemonFixture) async throws -> AdoptResponse {
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

    /// The processes the broker has after one SIGKILL of it, once its successor serves.
    static func processesAfterABrokerCrash(_ daemon: DaemonFixture) async throws -> Set<String> {
        _ = try await killBroker(of: daemon, times: 1, pause: 0...0)
        return Set(try await daemon.brokerStreams().map(\.process))
    }

    /// The supervisor's fds that are the pipe `fd` is an end of.
    static func copies(of fd: Int32, in pid: pid_t) -> [Int32] {
        var status = stat()
        guard fstat(fd, &status) == 0 else { return [] }
        return descriptorTable(pid: pid).filter { $0.value == "pipe:[\(status.st_ino)]" }.map(\.key)
    }

    /// Writes 16 KiB into `pipe` and closes it; what the host got from `output` must be exact.
    static func expectRelayedExact(_ pipe: PipeEnds, to output: Task<[UInt8], Never>, seed: UInt64) async throws {
        var random = SeededRandom(seed: seed)
        let written = (0..<(16 * 1024)).map { _ in UInt8.random(in: 0...255, using: &random) }
        #expect(written.withUnsafeBytes { write(pipe.write, $0.baseAddress, $0.count) } == written.count)
        close(pipe.write)
        let received = try await withTimeout("the process's output", .seconds(30)) { await output.value }
        #expect(sha256Hex(received) == sha256Hex(written), "\(received.count) of \(written.count) bytes")
    }

    /// The supervisor at its limit on open files when the broker deposits a handoff process's
    /// fds: they do not arrive (MSG_CTRUNC). Before, the deposit was dropped without a word and
    /// the runtime was told the process survives a broker crash; now the supervisor answers that
    /// it keeps nothing, and the runtime is told `false`.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: prlimit on the daemon, and its broker runs as a uid of its own"))
    func aDepositTheSupervisorHasNoFdsForIsAnsweredFalse() async throws {
        let daemon = try await DaemonFixture(brokerRestartBackoffMax: "200ms")
        defer { daemon.cleanUp() }
        let pid = daemon.daemonPID
        let before = try #require(OpenFileLimits.of(pid))
        let output = collect(try daemon.streams.open(token: bytes("s-out"), direction: .receive))
        _ = try daemon.streams.open(token: bytes("l-out"), direction: .receive)
        let (short, later) = (try PipeEnds.make(), try PipeEnds.make())
        defer { close(later.write) }

        // A soft limit of 3, under every fd it has but its stdio: no fd can arrive at all.
        try #require((0...2).allSatisfy { descriptorTable(pid: pid)[Int32($0)] != nil })
        #expect(hft_set_nofile_soft(pid, 3) == 0, "prlimit: errno \(errno)")
        // Recorded, not thrown: the limit must come back either way.
        var answer: AdoptResponse?
        await #expect(throws: Never.self) { answer = try await Self.adopt("short", "s-out", short.read, on: daemon) }
        #expect(hft_set_nofile_soft(pid, before.soft) == 0, "prlimit back: errno \(errno)")
        #expect(answer?.survivesBrokerCrash == false && answer?.reason?.contains("its fds did not arrive") == true, "why, in the answer: \(String(describing: answer))")
        try await daemon.waitForLog("a handoff process is adopted without surviving a broker crash")
        // The supervisor's line and the broker's come from two processes, each through its own
        // log writer thread: the broker's can be written first (a fresh clone read the log then).
        try await daemon.waitForLog("fds were not kept")
        let lines = daemon.log.split(separator: "\n")
        let refused = lines.filter { $0.contains("fds were not kept") }
        #expect(refused.count == 1 && refused[0].contains("process=short") && refused[0].contains("did not arrive"), "\(refused)")
        let warned = lines.filter { $0.contains("without surviving a broker crash") }
        #expect(warned.count == 1 && warned[0].contains("process=short") && warned[0].contains("the supervisor did not keep"), "\(warned)")
        #expect(Self.copies(of: short.write, in: pid).isEmpty, "the supervisor holds no copy of the process's pipe")
        try await Self.expectRelayedExact(short, to: output, seed: 0x5407)

        // Its fds back, the supervisor keeps the next deposit, and a crash costs that one nothing.
        #expect(try await Self.adopt("later", "l-out", later.read, on: daemon) == AdoptResponse(survivesBrokerCrash: true))
        #expect(!Self.copies(of: later.write, in: pid).isEmpty, "the supervisor holds the next process's pipe")
        let processes = try await Self.processesAfterABrokerCrash(daemon)
        #expect(processes == ["later"], "\(processes)\n\(daemon.log.suffix(6000))")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A supervisor that answers a deposit late: stopped (SIGSTOP, as a debugger or an operator
    /// would; a starved one is the same) for 7 s while a runtime adopts. The adopt stops waiting
    /// after `Broker.depositAnswerWait` and the runtime is told `false`, but the process is
    /// relayed with its checkpoint slots and the deposit waits in the supervisor's channel:
    /// continued, the supervisor keeps the copies and says so, and from then on the process
    /// survives a broker crash, its bytes exact across it. Before, the broker let the deposit go
    /// at its 5 s (`handoff-ended` after it): the process went down with the next broker crash
    /// however soon the supervisor came back.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aDepositTheSupervisorAnswersLateSurvivesACrashFromThen() async throws {
        let daemon = try await DaemonFixture(brokerRestartBackoffMax: "200ms")
        defer { daemon.cleanUp() }
        let pid = daemon.daemonPID
        let output = collect(try daemon.streams.open(token: bytes("m-out"), direction: .receive))
        let pipe = try PipeEnds.make()

        let stopped = ContinuousClock.now
        #expect(kill(pid, SIGSTOP) == 0)
        let continued = PinnedProcess(pid)  // signalled through its pidfd: never a later holder of its number
        defer { continued?.signal(SIGCONT) }
        let answer: AdoptResponse
        do {
            // The stop is the kernel's to finish: every thread of it, before the adopt.
            try await eventually("the supervisor's every thread stopped", timeout: .seconds(5)) { everyThreadStopped(pid) }
            answer = try await Self.adopt("late", "m-out", pipe.read, on: daemon)
        } catch {
            kill(pid, SIGCONT)
            throw error
        }
        let waited = ContinuousClock.now - stopped
        #expect(!answer.survivesBrokerCrash && answer.reason?.contains("did not answer its deposit within 5s") == true, "\(answer)")
        #expect(waited >= .milliseconds(4900), "the adopt waited out the supervisor's word: \(waited)")
        // Relayed meanwhile, before the supervisor says anything.
        var random = SeededRandom(seed: 0x1A7E)
        let written = (0..<(16 * 1024)).map { _ in UInt8.random(in: 0...255, using: &random) }
        #expect(written[..<8192].withUnsafeBytes { write(pipe.write, $0.baseAddress, $0.count) } == 8192)
        try await Task.sleep(until: stopped + .seconds(7))
        #expect(kill(pid, SIGCONT) == 0)

        // (Recorded, not thrown: what a broker crash does then is the point.)
        let word = (try? await daemon.waitForLog("the supervisor kept a handoff process's fds after its adopt was answered", timeout: .seconds(20))) != nil
        #expect(word, "the supervisor's late word, in the broker's log")
        let lines = daemon.log.split(separator: "\n")
        let warned = lines.filter { $0.contains("without surviving a broker crash") }
        #expect(warned.count == 1 && warned[0].contains("process=late") && warned[0].contains("did not answer"), "\(warned)")
        #expect(lines.filter { $0.contains("kept a handoff process's fds after its adopt") }.allSatisfy { $0.contains("process=late") })
        #expect(!Self.copies(of: pipe.write, in: pid).isEmpty, "the supervisor holds the process's pipe")
        try await eventually("the first half relayed", timeout: .seconds(20)) {
            try await daemon.brokerStreams().filter { $0.process == "late" }.map(\.bytesToHost) == [8192]
        }
        let shown = try await daemon.brokerStreams().filter { $0.process == "late" }.map(\.survivesBrokerCrash)
        #expect(shown == [nil], "no longer shown unkept: \(shown)")

        // What the word says holds: a broker crash, and the next broker has the process.
        let processes = try await Self.processesAfterABrokerCrash(daemon)
        #expect(processes == ["late"], "\(processes)\n\(daemon.log.suffix(6000))")
        #expect(written[8192...].withUnsafeBytes { write(pipe.write, $0.baseAddress, $0.count) } == 8192)
        close(pipe.write)
        let received = try await withTimeout("the process's output", .seconds(30)) { await output.value }
        #expect(sha256Hex(received) == sha256Hex(written), "\(received.count) of \(written.count) bytes, across the crash")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// The supervisor's word on a deposit comes late (a failpoint holds every answer back 7 s,
    /// past the adopt's 5 s wait); meanwhile the runtime releases the process and adopts the id
    /// again. The first deposit's word, come while the second waits, was taken for the second's:
    /// the runtime was told its process survives a broker crash on the word for another deposit
    /// (had the supervisor refused the second, its process would have died with the next
    /// broker). Answers are matched by deposit now: the second hears its own word is not in yet.
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the supervisor's answer is held back at a failpoint, which only debug builds have"))
    func aLateWordOnAnEarlierDepositIsNotTakenForTheNextOneOfTheID() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.depositAnsweredLate):again"])
        defer { daemon.cleanUp() }
        _ = try daemon.streams.open(token: bytes("a1-out"), direction: .receive)
        _ = try daemon.streams.open(token: bytes("a2-out"), direction: .receive)
        let (first, second) = (try PipeEnds.make(), try PipeEnds.make())
        defer {
            close(first.write)
            close(second.write)
        }
        let firstAnswer = try await Self.adopt("again", "a1-out", first.read, on: daemon)
        #expect(firstAnswer.survivesBrokerCrash == false, "its word 7 s late: \(firstAnswer)")
        // Released and adopted again at once: the first's word comes about 2 s later, while the
        // second waits for its own.
        let runtime = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        let release = BrokerRequest.release(process: "again")
        let released = try await runtime.request(release.frameType, body: release.body)
        for fd in released.descriptors { close(fd) }
        runtime.close()
        let secondAnswer = try await Self.adopt("again", "a2-out", second.read, on: daemon)
        #expect(secondAnswer.survivesBrokerCrash == false, "the first deposit's word is not the second's: \(secondAnswer)")
        #expect(secondAnswer.reason?.contains("did not answer") == true, "\(secondAnswer)")
        // Its own word comes, late, and is taken as its own.
        try await daemon.waitForLog("the supervisor kept a handoff process's fds after its adopt was answered", timeout: .seconds(20))
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A second adopt of an id while the first waits for the supervisor's word (here past the
    /// adopt's wait: a failpoint holds it back 7 s), from a runtime or a create: refused, as if
    /// the first were in.
    /// Before, the second got in (its slots refused for the id, so without crash-survival) and
    /// the first was refused once answered — after the supervisor had kept its copies under the
    /// id, or, with a create, had them overwritten by the create's and left open for good.
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the supervisor's answer is held back at a failpoint, which only debug builds have"))
    func aSecondAdoptOfTheIdWhileTheFirstWaitsIsRefused() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.depositAnsweredLate):dup"])
        defer { daemon.cleanUp() }
        let pid = daemon.daemonPID
        let output = collect(try daemon.streams.open(token: bytes("d1-out"), direction: .receive))
        _ = try daemon.streams.open(token: bytes("d2-out"), direction: .receive)
        _ = try daemon.streams.open(token: bytes("d3-out"), direction: .receive)
        let (first, second) = (try PipeEnds.make(), try PipeEnds.make())
        defer { close(second.write) }

        let firstAnswer = Task { try await Self.adopt("dup", "d1-out", first.read, on: daemon) }
        try await daemon.waitForLog("keeping a handoff process's fds")
        let refused = await #expect(throws: HoldfastError.self) { try await Self.adopt("dup", "d2-out", second.read, on: daemon) }
        #expect(refused?.code == .processExists && refused?.message.contains("is being adopted") == true, "\(String(describing: refused))")
        let created = await #expect(throws: HoldfastError.self) {
            try await daemon.launch(ProcessSpec(id: "dup", argv: ["true"], stdout: daemon.spec("d3-out")))
        }
        #expect(created?.code == .processExists, "\(String(describing: created))")

        #expect(try await firstAnswer.value.survivesBrokerCrash == false)
        let streams = try await daemon.brokerStreams().filter { $0.process == "dup" }
        #expect(streams.count == 1, "one process of the id, with the first adopt's stream: \(streams)")
        // Its word, late, is the first's: it keeps the first's copies, none of the refused adopt's.
        try await daemon.waitForLog("the supervisor kept a handoff process's fds after its adopt was answered")
        #expect(!Self.copies(of: first.write, in: pid).isEmpty, "the supervisor holds the first adopt's pipe")
        #expect(Self.copies(of: second.write, in: pid).isEmpty, "not the refused adopt's")
        try await Self.expectRelayedExact(first, to: output, seed: 0xD0B1)
        #expect(try await daemon.stop() == .exited(0))
    }
}
