import HoldfastPosix
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A stop signals what a process left in its group after its leader was reaped, never whoever
/// holds the number since (`Supervisor.signalProcessGroup`).
@Suite("ProcessGroupSignal: a group whose leader is reaped", .timeLimit(.minutes(1)))
struct ProcessGroupSignalTests {
    @Test func theGroupsMembersAreSignalledAndAStrangerWithTheNumberIsNot() async throws {
        let processes = TestProcesses()
        defer { processes.killAll() }
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        // A session of its own (its pid is its group's); it leaves a child in the group and exits.
        let pidFile = directory.file("child")
        let leader = try processes.start(["sh", "-c", "sleep 30 & echo $! > \(pidFile)"])
        #expect(try await processes.wait(leader) == .exited(0))  // reaped: the number is free as a pid
        let child = try #require(pid_t(String(decoding: readFile(pidFile) ?? [], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)))
        let pinned = try #require(PinnedProcess(child))
        #expect(getpgid(child) == leader, "the child is in the leader's group")
        #expect(ProcessGroupSignal.sendAfterLeaderReaped(group: leader, SIGTERM) == .sent)
        try await eventually("the group's member ended") { !pinned.signal(0) || ProcessRunState.of(child) == .gone }

        // A process that has the number as its pid: the group is gone, and nothing is sent.
        let stranger = try processes.start(["sleep", "30"])
        #expect(ProcessGroupSignal.sendAfterLeaderReaped(group: stranger, SIGTERM) == .numberTaken)
        #expect(ProcessRunState.of(stranger) != .gone, "the stranger is untouched")
        #expect(ProcessGroupSignal.sendAfterLeaderReaped(group: leader, SIGTERM) == .noMembers, "nothing left of the group")
    }
}
