import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A runtime's handed-over process and the host's: one namespace of ids at the broker, kept
/// apart; and what a release gives back can be adopted again.
@Suite("Handed-over processes: their ids and their release", .timeLimit(.minutes(3)))
struct HandoffIdentityTests {
    /// The host cannot create, close the stdin of or resize a process a runtime handed over:
    /// a create of its id is refused before its program runs, the others `no-such-process`.
    /// Before, the create's program ran and was killed (refused at the broker's adopt), and the
    /// host's close-stdin or resize reached the runtime's process, its runtime never told.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func theHostCannotReachARuntimesProcessByItsId() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        _ = try daemon.streams.open(token: bytes("rt-out"), direction: .receive)
        let pipe = try PipeEnds.make()
        defer { close(pipe.write) }
        let answer = try await HandoffCrashSurvivalTests.adopt("web", "rt-out", pipe.read, on: daemon)
        #expect(answer.survivesBrokerCrash == true, "\(answer)")
        let ran = daemon.directory.file("ran")
        do {
            _ = try await daemon.bridge.create(ProcessSpec(id: "web", argv: ["sh", "-c", "touch \(ran)"]))
            Issue.record("the host created a process with a runtime's id")
        } catch {
            #expect(error.code == .processExists && error.message.contains("a runtime handed it over"), "\(error)")
        }
        try await Task.sleep(for: .milliseconds(300))
        #expect(access(ran, F_OK) != 0, "its program never ran")
        for request in [{ try await daemon.bridge.closeStdin("web") }, { try await daemon.bridge.resize("web", rows: 10, columns: 20) }] {
            do {
                try await request()
                Issue.record("the host reached a runtime's process")
            } catch let error as HoldfastError {
                #expect(error.code == .noSuchProcess, "\(error)")
            }
        }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A release's streams can be adopted again as they are: they no longer name the
    /// supervisor's checkpoint slots (refused `permission-denied` before).
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aReleasedProcessIsAdoptedAgainWithTheStreamsItsReleaseGave() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        _ = try daemon.streams.open(token: bytes("again-out"), direction: .receive)
        let pipe = try PipeEnds.make()
        defer { close(pipe.write) }
        _ = try await HandoffCrashSurvivalTests.adopt("again", "again-out", pipe.read, on: daemon)
        let runtime = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        defer { runtime.close() }
        let release = BrokerRequest.release(process: "again")
        let reply = try await runtime.request(release.frameType, body: release.body)
        let released = try ControlJSON.decode(ReleaseResponse.self, from: reply.frame.body, frameType: reply.frame.type)
        #expect(reply.descriptors.count == 1 && released.streams.count == 1)
        #expect(released.streams.allSatisfy { $0.checkpoint == nil && $0.window == nil && $0.resume == nil }, "\(released.streams)")
        let adopt = BrokerRequest.adopt(AdoptRequest(process: "again", streams: released.streams))
        let again = try await runtime.request(adopt.frameType, body: adopt.body, descriptors: reply.descriptors)
        let answer = try ControlJSON.decode(AdoptResponse.self, from: again.frame.body, frameType: again.frame.type)
        #expect(answer.survivesBrokerCrash == true, "\(answer)")
        for fd in reply.descriptors { close(fd) }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Two adopts of one pipe at once, under two ids, while the first waits for the supervisor's
    /// word on its deposit (the supervisor stopped): one is refused `bad-descriptor`. Before,
    /// the check looked at the table alone: both were answered and the pipe's bytes were split
    /// between two host streams.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func onePipeAdoptedTwiceAtOnceIsRefusedOnce() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        _ = try daemon.streams.open(token: bytes("one-out"), direction: .receive)
        _ = try daemon.streams.open(token: bytes("two-out"), direction: .receive)
        let pipe = try PipeEnds.make()
        defer { close(pipe.write) }
        let copy = dup(pipe.read)
        #expect(kill(daemon.daemonPID, SIGSTOP) == 0)
        let continued = PinnedProcess(daemon.daemonPID)  // signalled through its pidfd: never a later holder of its number
        defer { continued?.signal(SIGCONT) }
        try await eventually("the supervisor stopped") { ProcessRunState.of(daemon.daemonPID) == .stopped }
        func adopt(_ process: String, _ fd: Int32) async -> Result<AdoptResponse, HoldfastError> {
            do {
                return .success(try await HandoffCrashSurvivalTests.adopt(process, "\(process)-out", fd, on: daemon))
            } catch let error as HoldfastError {
                return .failure(error)
            } catch {
                return .failure(HoldfastError(.unknown, "\(error)"))
            }
        }
        async let first = adopt("one", pipe.read)
        async let second = adopt("two", copy)
        let results = await [first, second]
        kill(daemon.daemonPID, SIGCONT)
        let refused = results.compactMap { result -> HoldfastError? in if case .failure(let error) = result { error } else { nil } }
        #expect(refused.count == 1 && refused.first?.code == .badDescriptor, "\(results)")
        #expect(try await daemon.stop() == .exited(0))
    }
}

