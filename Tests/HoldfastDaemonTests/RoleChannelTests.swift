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

extension RoleChannelTests {
    /// Stops a fake role's supervisor and its run loop (the reaper's loop driven here, as a
    /// SIGCHLD would drive it).
    private static func stop(_ role: RoleSupervisor, _ running: Task<Void, Never>, reaper: ChildReaper, within limit: Duration) async throws {
        role.stop()
        try await eventually("the role supervisor stopped", timeout: limit) {
            reaper.reapAll()
            return role.pid == nil
        }
        running.cancel()
    }

    /// A fake role whose end of the channel another process keeps open (so end-of-file never
    /// comes): it writes `words` messages and is gone. Returns the role supervisor and what its
    /// serve heard, incarnation by incarnation.
    private static func roleThatLeavesItsEndOpen(
        words: Int, serve read: @escaping @Sendable (Int, FDChannel, NIOLockedValueBox<[Int: [String]]>) async -> Void,
        quietFor: Duration, readFor: Duration, reaper: ChildReaper
    ) -> (RoleSupervisor, NIOLockedValueBox<[Int: [String]]>, NIOLockedValueBox<[Int32]>) {
        let heard = NIOLockedValueBox<[Int: [String]]>([:])
        let kept = NIOLockedValueBox<[Int32]>([])
        let starts = NIOLockedValueBox(0)
        let incarnationOf = NIOLockedValueBox<[pid_t: Int]>([:])
        let role = RoleSupervisor(
            name: "fake", logger: Logger(label: "test"), reaper: reaper,
            launch: {
                let start = starts.withLockedValue { $0 += 1; return $0 }
                let (ours, theirs) = try FDChannel.pair()
                for word in 1...words {
                    let message = Array("incarnation \(start) word \(word)".utf8)
                    #expect(send(theirs, message, message.count, 0) == message.count)
                }
                kept.withLockedValue { $0.append(theirs) }
                let child = try reaper.spawn(SpawnOptions(executable: "/bin/true", arguments: ["true"]))
                incarnationOf.withLockedValue { $0[child.pid] = start }
                heard.withLockedValue { $0[start] = [] }
                return .init(pid: child.pid, child: child, channel: FDChannel(try AsyncFD(adopting: ours)))
            },
            serve: { incarnation in
                let start = incarnationOf.withLockedValue { $0[incarnation.pid]! }
                await read(start, incarnation.channel, heard)
            },
            maxBackoff: .milliseconds(100), channelQuietFor: quietFor, channelReadFor: readFor)
        return (role, heard, kept)
    }

    /// A supervisor slow to read a dead role's channel still hears all of it: the reader starts
    /// 600 ms after the role was started (it is reaped within a few ms), three times the quiet
    /// period the channel is given here (200 ms; 2 s in the daemon), and the role's end is kept
    /// open elsewhere, so only our close ends the channel. Before, it was closed a fixed time
    /// after the reaping: a loaded supervisor (or one an operator stopped for a moment) lost the
    /// role's last notifications under it — a broker's `handoff-exited` or `drained`, and so a
    /// process never let go. And once it is read, it is closed without waiting the whole bound
    /// (20 s here): the next incarnation comes.
    @Test func aSlowReaderHearsEveryLastWordAndTheChannelClosesOnceRead() async throws {
        guard try await isolated("aSlowReaderHearsEveryLastWordAndTheChannelClosesOnceRead", timeout: .seconds(60)) else { return }
        let reaper = ChildReaper()
        let (role, heard, kept) = Self.roleThatLeavesItsEndOpen(
            words: 3,
            serve: { start, channel, heard in
                try? await Task.sleep(for: .milliseconds(600))
                while let message = try? await channel.receive() {
                    heard.withLockedValue { $0[start, default: []].append(String(decoding: message.payload, as: UTF8.self)) }
                }
            },
            quietFor: .milliseconds(200), readFor: .seconds(20), reaper: reaper)
        defer { for fd in kept.withLockedValue({ $0 }) { close(fd) } }
        let running = Task { await role.run() }
        try await eventually("a third incarnation, each channel closed well within its 20 s bound", timeout: .seconds(10)) {
            reaper.reapAll()
            return heard.withLockedValue { $0.count } >= 3
        }
        try await Self.stop(role, running, reaper: reaper, within: .seconds(20))
        let words = heard.withLockedValue { $0 }
        for start in 1...2 {
            #expect(words[start] == (1...3).map { "incarnation \(start) word \($0)" }, "every word of incarnation \(start), once, in order: \(words)")
        }
    }

    /// The bound counts the supervisor's checks, not the clock: a supervisor stopped for 5 s
    /// (SIGSTOP by an operator; a suspended guest's clock runs on the same way) while a dead
    /// role's last words wait unread, then reading them 1 s after it goes on, hears all of them.
    /// Counted by the clock, its first check after the stop found the 3 s bound passed and
    /// closed the channel under them (a broker's `drained` or `handoff-exited` lost: a process
    /// never let go). (In a process of its own: the test stops it.)
    @Test func aStopOfTheSupervisorIsNotTimeItCouldReadADeadRolesChannelIn() async throws {
        guard try await isolated("aStopOfTheSupervisorIsNotTimeItCouldReadADeadRolesChannelIn", timeout: .seconds(60)) else { return }
        let reaper = ChildReaper()
        let readNow = NIOLockedValueBox(false)
        let (role, heard, kept) = Self.roleThatLeavesItsEndOpen(
            words: 3,
            serve: { start, channel, heard in
                while start == 1, !readNow.withLockedValue({ $0 }) { try? await Task.sleep(for: .milliseconds(20)) }
                while let message = try? await channel.receive() {
                    heard.withLockedValue { $0[start, default: []].append(String(decoding: message.payload, as: UTF8.self)) }
                }
            },
            quietFor: .milliseconds(200), readFor: .seconds(3), reaper: reaper)
        defer { for fd in kept.withLockedValue({ $0 }) { close(fd) } }
        let running = Task { await role.run() }
        var first: pid_t?
        try await eventually("the first incarnation, reaped", timeout: .seconds(10)) {
            first = first ?? role.pid
            reaper.reapAll()
            guard let first else { return false }
            return access("/proc/\(first)", F_OK) != 0
        }
        try await Task.sleep(for: .milliseconds(300))  // a check or so of the channel
        // This process stopped for 5 s, as an operator's SIGSTOP would, then continued.
        let stopper = try reaper.spawn(SpawnOptions(executable: "/bin/sh", arguments: ["sh", "-c", "kill -STOP $PPID; sleep 5; kill -CONT $PPID"]))
        try await eventually("the stop over", timeout: .seconds(30)) {
            reaper.reapAll()
            return access("/proc/\(stopper.pid)", F_OK) != 0
        }
        try await Task.sleep(for: .seconds(1))
        readNow.withLockedValue { $0 = true }
        try await eventually("the second incarnation", timeout: .seconds(10)) {
            reaper.reapAll()
            return heard.withLockedValue { $0.count } >= 2
        }
        #expect(heard.withLockedValue { $0[1] } == (1...3).map { "incarnation 1 word \($0)" }, "every last word of the dead role")
        try await Self.stop(role, running, reaper: reaper, within: .seconds(20))
    }

    /// The bound all the same: a reader that keeps a dead role's channel busy for good (one
    /// message a second, 20 waiting) does not hold the role's restart for good: the channel is
    /// closed after 1.5 s here (30 s in the daemon), unread messages and all, and the next
    /// incarnation starts.
    @Test func aReaderThatNeverCatchesUpIsClosedAfterTheBound() async throws {
        guard try await isolated("aReaderThatNeverCatchesUpIsClosedAfterTheBound", timeout: .seconds(60)) else { return }
        let reaper = ChildReaper()
        let (role, heard, kept) = Self.roleThatLeavesItsEndOpen(
            words: 20,
            serve: { start, channel, heard in
                while let message = try? await channel.receive() {
                    heard.withLockedValue { $0[start, default: []].append(String(decoding: message.payload, as: UTF8.self)) }
                    try? await Task.sleep(for: .seconds(1))
                }
            },
            quietFor: .milliseconds(200), readFor: .milliseconds(1500), reaper: reaper)
        defer { for fd in kept.withLockedValue({ $0 }) { close(fd) } }
        let running = Task { await role.run() }
        try await eventually("a second incarnation", timeout: .seconds(15)) {
            reaper.reapAll()
            return heard.withLockedValue { $0.count } >= 2
        }
        let first = heard.withLockedValue { $0[1] ?? [] }
        #expect(!first.isEmpty && first.count < 20, "the first incarnation's channel closed with words unread: heard \(first.count)")
        #expect(first == (1...first.count).map { "incarnation 1 word \($0)" })
        try await Self.stop(role, running, reaper: reaper, within: .seconds(30))
    }
}
