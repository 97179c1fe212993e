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

/// How `host serve` decides a process's outcome, against a scripted guest on its bridge (no
/// daemon, no root): the cases a real daemon reaches only through a bug or bad luck, each made
/// to happen on purpose. The client is `HostClient.run`, as `holdfast host run` uses it.
@Suite("host serve: an exit, a restart or a vanished process ends host run", .timeLimit(.minutes(5)))
struct HostServiceOutcomeTests {
    /// The VM's bridge key, shared by host serve and the scripted guest.
    static let key = BridgeKey.generate()

    /// A guest's bridge connection: authenticates, says hello, answers creates, lists and acknowledgements as
    /// told, and can report exits.
    final class ScriptedGuest: Sendable {
        let socket: AsyncFD
        let writer: ControlFrameWriter<AsyncFD>
        /// The ids `list` answers with.
        let listed = NIOLockedValueBox<[String]>([])
        let creates = NIOLockedValueBox<[ProcessSpec]>([])
        let lists = NIOLockedValueBox(0)
        let acknowledged = NIOLockedValueBox<[String]>([])

        init(_ address: SocketAddress, instance: String, exits: [ExitReport] = []) async throws {
            socket = try await Dialer.connect(to: address)
            try await BridgeHandshake.authenticateHost(on: socket, key: HostServiceOutcomeTests.key)
            writer = ControlFrameWriter(socket)
            let hello = BridgeHello(bootID: "00000000-0000-0000-0000-000000000000", processes: [], exits: exits, instanceID: instance)
            writer.send(ControlFrame(type: BridgeMessageType.hello.rawValue, id: 0, body: ControlJSON.encode(hello)))
            Task { [self] in await answer() }
        }

        private func answer() async {
            while let frame = try? await ControlFrameIO.read(from: socket, maxBody: BridgeProtocol.maxBody) {
                var reply: [UInt8] = ControlJSON.encode([String: String]())
                switch BridgeMessageType(rawValue: frame.type) {
                case .create:
                    guard let spec = try? ControlJSON.decode(ProcessSpec.self, from: frame.body, frameType: frame.type) else { continue }
                    creates.withLockedValue { $0.append(spec) }
                    listed.withLockedValue { $0.append(spec.id) }
                    reply = ControlJSON.encode(LaunchResponse(pid: 4242))
                case .list:
                    lists.withLockedValue { $0 += 1 }
                    let ids = listed.withLockedValue { $0 }
                    reply = ControlJSON.encode(BridgeListResponse(
                        processes: ids.map { ProcessStatus(id: $0, pid: 4242, state: .running, exitCode: nil) }, streams: []))
                case .acknowledgeExit:
                    if let request = try? ControlJSON.decode(AcknowledgeExitRequest.self, from: frame.body, frameType: frame.type) {
                        acknowledged.withLockedValue { $0.append(request.id) }
                    }
                default:
                    break
                }
                writer.send(ControlFrame(type: BridgeMessageType.ok.rawValue, id: frame.id, body: reply))
            }
        }

        func reportExit(_ report: ExitReport) {
            writer.send(ControlFrame(type: BridgeMessageType.exit.rawValue, id: 0, body: ControlJSON.encode(report)))
        }

        func close() {
            writer.finish()
            socket.close()
        }
    }

    /// host serve in this process, a scripted guest on its bridge, and /dev/null as the
    /// client's stdio.
    struct Setup {
        let directory: TemporaryDirectory
        let service: HostService
        let serving: Task<Void, Never>
        let null: (input: Int32, output: Int32)

        init(guestStreams: SocketAddress? = nil, say: @escaping @Sendable (String) -> Void = { _ in }) throws {
            directory = try TemporaryDirectory()
            service = try HostService(
                bridge: .unix(path: directory.file("bridge.sock")), bridgeKey: HostServiceOutcomeTests.key,
                streams: .unix(path: directory.file("streams.sock")), guestStreams: guestStreams,
                control: directory.file("host.sock"), listInterval: .milliseconds(50), say: say)
            serving = Task { [service] in await service.run() }
            null = (open("/dev/null", O_RDONLY | O_CLOEXEC), open("/dev/null", O_WRONLY | O_CLOEXEC))
        }

        var bridge: SocketAddress { .unix(path: directory.file("bridge.sock")) }

        /// `host run` of `id` with a short drain timeout: the streams are never connected here,
        /// so they are silent from the start.
        func run(_ id: String) -> Task<HostRunOutcome, any Error> {
            let control = directory.file("host.sock")
            let stdio = HostClient.Stdio(input: null.input, output: null.output, error: null.output)
            return Task {
                try await HostClient.run(
                    control: control, request: HostRunRequest(id: id, argv: ["true"]), drainTimeout: .milliseconds(200), stdio: stdio)
            }
        }

        func tearDown() {
            serving.cancel()
            service.close()
            close(null.input)
            close(null.output)
            directory.remove()
        }
    }

    /// A compromised guest's text holds escape sequences and newlines: an exit of an id nobody
    /// created, and ids it lists. host serve's lines write them out, and so does `host ps`'s
    /// table: none reaches the operator's terminal, and no line is forged.
    @Test func whatAGuestSaysReachesNoTerminalAsControlCharacters() async throws {
        let said = NIOLockedValueBox<[String]>([])
        let setup = try Setup { line in said.withLockedValue { $0.append(line) } }
        defer { setup.tearDown() }
        try await eventually("host serve's control socket") { access(setup.directory.file("host.sock"), F_OK) == 0 }
        let hostile = "x\u{1b}]0;owned\u{07}\u{1b}[2J\n[forged] holdfast host: all well"
        let guest = try await ScriptedGuest(setup.bridge, instance: "a1", exits: [ExitReport(id: hostile, exitCode: 0, signal: nil, undelivered: 0)])
        defer { guest.close() }
        guest.listed.withLockedValue { $0 = [hostile] }
        try await eventually("the exit said") { said.withLockedValue { $0 }.contains { $0.contains("owned") } }
        let lines = said.withLockedValue { $0 }
        let controls = lines.flatMap { $0.unicodeScalars.filter(TerminalText.isControl) }
        #expect(controls.isEmpty, "\(lines)")
        #expect(lines.contains { $0.contains(#"x\u{1b}]0;owned\u{7}\u{1b}[2J\n[forged]"#) }, "\(lines)")
        let list = try await HostClient.processes(control: setup.directory.file("host.sock"), all: true)
        #expect(list.processes.contains { $0.id == hostile }, "listed as the guest said (JSON keeps it exact)")
        let table = HostClient.render(list)
        #expect(!table.unicodeScalars.contains { $0 != "\n" && TerminalText.isControl($0) }, "\(table.debugDescription)")
    }

    /// A host serve that was restarted holds none of the processes its predecessor started, and
    /// their exits come to it (in the hello, or later). They are acknowledged to the guest, which
    /// then forgets them: kept only in a log line before, the exit code was lost for good. Now
    /// `wait` gives it and `ps -a` lists it.
    @Test func anExitOfAProcessAnEarlierHostServeStartedIsKept() async throws {
        let setup = try Setup()
        defer { setup.tearDown() }
        try await eventually("host serve's control socket") { access(setup.directory.file("host.sock"), F_OK) == 0 }
        let earlier = ExitReport(id: "from-before", exitCode: 7, signal: nil, undelivered: 0)
        let guest = try await ScriptedGuest(setup.bridge, instance: "a1", exits: [earlier])
        defer { guest.close() }
        try await eventually("the exit acknowledged") { guest.acknowledged.withLockedValue { $0 } == ["from-before"] }
        let outcome = try await HostClient.waitForExit(control: setup.directory.file("host.sock"), id: "from-before")
        #expect(outcome.exit == earlier, "\(outcome)")
        let later = ExitReport(id: "later", exitCode: 0, signal: 9, undelivered: 0)
        guest.reportExit(later)
        try await eventually("the later exit acknowledged") { guest.acknowledged.withLockedValue { $0 }.contains("later") }
        let list = try await HostClient.processes(control: setup.directory.file("host.sock"), all: true)
        let listed = list.processes.filter { ["from-before", "later"].contains($0.id) }.map { "\($0.id) \($0.state) \($0.exitCode ?? -1)" }
        #expect(Set(listed) == ["from-before exited 7", "later exited 0"], "\(listed)")
    }

    @Test func anExitEndsTheRunAndStreamsThatNeverEndAreEndedAfterTheDrainTimeout() async throws {
        let setup = try Setup()
        defer { setup.tearDown() }
        try await eventually("host serve's control socket") { access(setup.directory.file("host.sock"), F_OK) == 0 }
        let guest = try await ScriptedGuest(setup.bridge, instance: "a1")
        defer { guest.close() }
        let run = setup.run("job")
        try await eventually("the create") { guest.creates.withLockedValue { $0.count } == 1 }
        let report = ExitReport(id: "job", exitCode: 3, signal: nil, undelivered: 0)
        guest.reportExit(report)
        let outcome = try await withTimeout("host run's outcome") { try await run.value }
        #expect(outcome == .exited(report, endedByHost: ["stdout", "stderr"]))
        #expect(outcome.exitCode == 3)
        try await eventually("the exit acknowledged") { guest.acknowledged.withLockedValue { $0 } == ["job"] }
        try await eventually("the process forgotten, its streams closed") {
            setup.service.processesHeld == 0 && setup.service.streams.statistics.streams == 0
        }
        // A late wait still gets the outcome.
        let late = try await withTimeout("a late attach") {
            try await HostClient.attach(
                control: setup.directory.file("host.sock"), id: "job", tty: false,
                stdio: HostClient.Stdio(input: setup.null.input, output: setup.null.output, error: setup.null.output))
        }
        #expect(late == outcome)
    }

    /// A host behind a VMM's hybrid vsock listens on a Unix socket and names, in each create,
    /// the vsock address the guest dials (`--guest-streams`); without it, where it listens.
    @Test func theStreamsOfACreateNameTheAddressTheGuestDials() async throws {
        for guestStreams in [SocketAddress.vsock(cid: 2, port: 1025), nil] {
            let setup = try Setup(guestStreams: guestStreams)
            defer { setup.tearDown() }
            try await eventually("host serve's control socket") { access(setup.directory.file("host.sock"), F_OK) == 0 }
            let guest = try await ScriptedGuest(setup.bridge, instance: "a1")
            defer { guest.close() }
            let run = setup.run("job")
            defer { run.cancel() }
            try await eventually("the create") { guest.creates.withLockedValue { $0.count } == 1 }
            let spec = try #require(guest.creates.withLockedValue { $0.first })
            let expected = guestStreams?.description ?? "unix:\(setup.directory.file("streams.sock"))"
            #expect(spec.stdout?.address == expected && spec.stderr?.address == expected, "\(String(describing: spec.stdout))")
            guest.reportExit(ExitReport(id: "job", exitCode: 0, signal: nil, undelivered: 0))
            _ = try await withTimeout("host run's outcome") { try await run.value }
        }
    }

    @Test func aHelloFromAnotherDaemonInstanceLosesTheProcess() async throws {
        let setup = try Setup()
        defer { setup.tearDown() }
        try await eventually("host serve's control socket") { access(setup.directory.file("host.sock"), F_OK) == 0 }
        let first = try await ScriptedGuest(setup.bridge, instance: "a1")
        let run = setup.run("job")
        try await eventually("the create") { first.creates.withLockedValue { $0.count } == 1 }
        first.close()
        // The same instance again (a migration): nothing is lost.
        let again = try await ScriptedGuest(setup.bridge, instance: "a1")
        again.listed.withLockedValue { $0 = ["job"] }
        try await eventually("a list from the same daemon") { again.lists.withLockedValue { $0 } >= 2 }
        #expect(setup.service.processesHeld == 1)
        again.close()
        // Another instance: that daemon is gone, and the process with it.
        let restarted = try await ScriptedGuest(setup.bridge, instance: "b2")
        defer { restarted.close() }
        let outcome = try await withTimeout("host run's outcome") { try await run.value }
        guard case .lost(let loss, _) = outcome else {
            Issue.record("expected a loss, got \(outcome)")
            return
        }
        #expect(loss.reason == .daemonRestarted)
        #expect(loss.message == "the guest's daemon restarted (instance a1 -> b2): process job is gone, its exit unknown")
        #expect(outcome.exitCode == HostExitCode.holdfastFailure)
    }

    @Test func aProcessTheGuestNoLongerListsIsLost() async throws {
        let setup = try Setup()
        defer { setup.tearDown() }
        try await eventually("host serve's control socket") { access(setup.directory.file("host.sock"), F_OK) == 0 }
        let guest = try await ScriptedGuest(setup.bridge, instance: "a1")
        defer { guest.close() }
        let run = setup.run("job")
        try await eventually("the create") { guest.creates.withLockedValue { $0.count } == 1 }
        let listsBefore = guest.lists.withLockedValue { $0 }
        try await eventually("two lists that have it") { guest.lists.withLockedValue { $0 } >= listsBefore + 2 }
        #expect(setup.service.processesHeld == 1, "listed: still running")
        guest.listed.withLockedValue { $0 = [] }
        let outcome = try await withTimeout("host run's outcome") { try await run.value }
        guard case .lost(let loss, _) = outcome else {
            Issue.record("expected a loss, got \(outcome)")
            return
        }
        #expect(loss.reason == .vanished)
        #expect(loss.message == "process job is no longer in the guest's process list and no exit came")
    }

    /// An exit is recorded before it is acknowledged, and the guest forgets a process only on
    /// that acknowledgement: a guest that drops the process from its list right after reporting
    /// the exit never makes it look lost.
    @Test func anExitFollowedByAnEmptyListIsAnExitNotALoss() async throws {
        let setup = try Setup()
        defer { setup.tearDown() }
        try await eventually("host serve's control socket") { access(setup.directory.file("host.sock"), F_OK) == 0 }
        let guest = try await ScriptedGuest(setup.bridge, instance: "a1")
        defer { guest.close() }
        let run = setup.run("job")
        try await eventually("the create") { guest.creates.withLockedValue { $0.count } == 1 }
        let report = ExitReport(id: "job", exitCode: 0, signal: nil, undelivered: 0)
        guest.reportExit(report)
        guest.listed.withLockedValue { $0 = [] }
        let outcome = try await withTimeout("host run's outcome") { try await run.value }
        #expect(outcome.exitCode == 0, "\(outcome)")
    }

    /// host serve stopping is not a process's outcome: the client ends with an error saying so
    /// (125 from the command line), not with a made-up exit code, and not never.
    @Test func hostServeGoingAwayEndsTheClientWithAnError() async throws {
        let setup = try Setup()
        defer { setup.tearDown() }
        try await eventually("host serve's control socket") { access(setup.directory.file("host.sock"), F_OK) == 0 }
        let guest = try await ScriptedGuest(setup.bridge, instance: "a1")
        defer { guest.close() }
        let run = setup.run("job")
        try await eventually("the create") { guest.creates.withLockedValue { $0.count } == 1 }
        try await eventually("the client waiting") { setup.service.processesHeld == 1 }
        setup.serving.cancel()
        setup.service.close()
        do {
            let outcome = try await withTimeout("host run's end") { try await run.value }
            Issue.record("an outcome without host serve: \(outcome)")
        } catch let error as HoldfastError {
            // Which error depends on how far the run had got (its create's reply, its wait).
            print("host serve gone: the client ended with \(error)")
        }
    }
}
