import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Logging
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

@testable import HoldfastSupervisor

/// What a role wrote on its channel just before it died is read before its next incarnation
/// starts: a broker's last notification (`handoff-releasing`, `handoff-deposited`) decides what
/// the next broker is handed. The supervisor closed its end of the channel as soon as it reaped
/// the role, which threw unread frames away whenever the reaping came first — a loaded run lost
/// a broker's `handoff-releasing` that way, and the next broker relayed pipes the runtime held.
@Suite("A dead role's channel is read to its end", .timeLimit(.minutes(2)))
struct RoleChannelTests {
    /// A fake role: it writes one message and is gone (its end closed, its process `true`)
    /// before the supervisor's reader looks; the reader starts 300 ms late, after the reaping.
    @Test func theLastWordsOfADeadRoleAreReadBeforeItsNextStart() async throws {
        guard try await isolated("theLastWordsOfADeadRoleAreReadBeforeItsNextStart", timeout: .seconds(60)) else { return }
        let reaper = ChildReaper()
        let heard = NIOLockedValueBox<[String]>([])
        let starts = NIOLockedValueBox(0)
        let role = RoleSupervisor(
            name: "fake", logger: Logger(label: "test"), reaper: reaper,
            launch: {
                let start = starts.withLockedValue { $0 += 1; return $0 }
                let (ours, theirs) = try FDChannel.pair()
                let words = Array("last words of incarnation \(start)".utf8)
                #expect(send(theirs, words, words.count, 0) == words.count)
                close(theirs)
                let child = try reaper.spawn(SpawnOptions(executable: "/bin/true", arguments: ["true"]))
                return .init(pid: child.pid, child: child, channel: FDChannel(try AsyncFD(adopting: ours)))
            },
            serve: { incarnation in
                try? await Task.sleep(for: .milliseconds(300))
                while let message = try? await incarnation.channel.receive() {
                    heard.withLockedValue { $0.append(String(decoding: message.payload, as: UTF8.self)) }
                }
            },
            maxBackoff: .milliseconds(100))
        let running = Task { await role.run() }
        // The reaper's loop, as a SIGCHLD would run it.
        try await eventually("two incarnations' last words", timeout: .seconds(20)) {
            reaper.reapAll()
            return heard.withLockedValue { $0.count } >= 2
        }
        role.stop()
        try await eventually("the role supervisor stopped", timeout: .seconds(20)) {
            reaper.reapAll()
            return role.pid == nil && starts.withLockedValue { $0 } == heard.withLockedValue { $0.count }
        }
        running.cancel()
        let words = heard.withLockedValue { $0 }
        #expect(words == (1...words.count).map { "last words of incarnation \($0)" }, "each incarnation's, once, in order: \(words)")
    }
}

extension RoleChannelTests {
    /// A bridge worker gone wrong — it sends the supervisor something that is not a control
    /// frame (a debug-build failpoint, right after its bridge came up) — is ended and started
    /// again. Before, the supervisor stopped reading the worker's channel and left it open, so
    /// the worker ran on holding the host's connection and every request the host sent through
    /// it waited for ever.
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the worker breaks its framing at a failpoint, which only debug builds have"))
    func aWorkerThatBreaksItsChannelsFramingIsStartedAgain() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.workerBreaksFraming):bridge"])
        defer { daemon.cleanUp() }
        try await daemon.waitForLog("the bridge worker broke its channel's framing: ending it (the worker restarts)")
        try await eventually("a second bridge worker started", timeout: .seconds(30)) {
            daemon.log.split(separator: "\n").filter { $0.contains("role started") && $0.contains("role=bridge") }.count == 2
        }
        // The host is served through the new worker.
        let listed = try await withDeadline("the host's list through the new worker", .seconds(30)) {
            var answer: BridgeListResponse?
            while answer == nil {
                answer = try? await daemon.bridge.list(timeout: .seconds(2))
                if answer == nil { try await Task.sleep(for: .milliseconds(100)) }
            }
            return answer!
        }
        #expect(listed.processes.isEmpty)
        let output = try daemon.streams.open(token: bytes("w-out"), direction: .receive)
        let received = collect(output)
        _ = try await daemon.launch(ProcessSpec(id: "w", argv: ["seq", "1", "2000"], stdout: daemon.spec("w-out")))
        #expect(try await daemon.wait("w").exitCode == 0)
        let all = try await withTimeout("the output") { await received.value }
        #expect(all == bytes((1...2000).map { "\($0)\n" }.joined()))
        #expect(try await daemon.stop() == .exited(0))
    }
}
