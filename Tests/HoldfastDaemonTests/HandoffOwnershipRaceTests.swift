import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A handoff peer manages only the processes it handed over. The check was made when its
/// request arrived and the process looked up again when the request was carried out: a process
/// of the supervisor's adopted between the two (a peer sending `release` of a guessed id, over
/// and over, from many connections) was released to the peer — its stdin's write end and its
/// outputs' read ends, the host's streams dropped — or drained, or had its stdin closed. The
/// look-up and the check are one step now. A debug-build failpoint holds a root peer's
/// `release` (root is a handoff peer like any other: the supervisor's processes are not its)
/// until the host's process of that id is running.
@Suite("A handoff peer gets no process adopted while its request waited", .timeLimit(.minutes(2)))
struct HandoffOwnershipRaceTests {
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the release is held at a failpoint, which only debug builds have"))
    func aReleaseHeldUntilTheSupervisorsProcessOfItsIdRunsIsRefused() async throws {
        let gate = try FailpointGate()
        defer { gate.remove() }
        var environment = gate.environment
        environment["HOLDFAST_FAILPOINT"] = "\(Failpoint.brokerReleaseReceived):victim"
        let daemon = try await DaemonFixture(environment: environment)
        defer { daemon.cleanUp() }
        let peer = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        let release = Task { () -> Result<Int, HoldfastError> in
            let request = BrokerRequest.release(process: "victim")
            do throws(HoldfastError) {
                let answer = try await peer.request(request.frameType, body: request.body)
                for fd in answer.descriptors { close(fd) }
                return .success(answer.descriptors.count)
            } catch {
                return .failure(error)
            }
        }
        try await daemon.waitForLog("failpoint: a release held before its look-up")
        let received = collect(try daemon.streams.open(token: bytes("victim-out"), direction: .receive))
        let go = daemon.directory.file("go")
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "victim", argv: ["sh", "-c", "while [ ! -e \(go) ]; do sleep 0.05; done; i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo line $i; done"],
            stdout: daemon.spec("victim-out")))
        try await eventually("the victim's stream connected") {
            try await daemon.brokerStreams().contains { $0.process == "victim" && $0.state == .connected }
        }
        try gate.open()
        // Bounded: the waits below never end once the peer holds the victim's pipes.
        switch try await withTimeout("the release's answer", .seconds(30), { await release.value }) {
        case .success(let fds): Issue.record("the peer was handed the supervisor's process: \(fds) fds")
        case .failure(let error): #expect(error.code == .permissionDenied, "\(error)")
        }
        try writeFile(go, [])
        let report = try await withDeadline("the victim's exit", .seconds(60)) { try await daemon.wait("victim") }
        #expect(report.exitCode == 0 && report.outputCutShort == nil, "\(report)")
        let output = try await withTimeout("the victim's output", .seconds(30)) { await received.value }
        #expect(output == expectedLines(300), "the victim's output, exact")
        #expect(try await daemon.stop() == .exited(0))
    }
}
