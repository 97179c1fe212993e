import HoldfastCore
import HoldfastPosix
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
