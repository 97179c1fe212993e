import HoldfastPosix
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A stop signals what a process left in its group one by one, after its leader was reaped:
/// only the group's members that descend from the supervisor, never whoever else holds the
/// number (`Supervisor.signalProcessGroup`).
@Suite("ProcessGroupMembers: a group's members below one ancestor", .timeLimit(.minutes(1)))
struct ProcessGroupMembersTests {
    @Test func theMembersOfAGroupBelowAnAncestorAreFoundAndNoOthers() async throws {
        let processes = TestProcesses()
        defer { processes.killAll() }
        // A session of its own (so its pid is its group's): the shell and two children.
        let leader = try processes.start(["sh", "-c", "sleep 30 & sleep 30 & wait"])
        let stranger = try processes.start(["sleep", "30"])
        try await eventually("the shell's two children") {
            ProcessGroupMembers.of(group: leader, descendingFrom: getpid()).count == 3
        }
        let members = Set(ProcessGroupMembers.of(group: leader, descendingFrom: getpid()))
        #expect(members.contains(leader))
        #expect(!members.contains(stranger), "another group's process is not a member")
        #expect(members.allSatisfy { getpgid($0) == leader })
        #expect(ProcessGroupMembers.of(group: leader, descendingFrom: stranger).isEmpty, "none descends from another ancestor")
        #expect(ProcessGroupMembers.of(group: stranger, descendingFrom: getpid()) == [stranger])
    }
}
