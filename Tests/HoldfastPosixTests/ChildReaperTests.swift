import HoldfastTestSupport
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

@Suite("ChildReaper: every exit to its own waiter", .timeLimit(.minutes(5)))
struct ChildReaperTests {
    /// An exit nobody waited for (an orphan's, under a subreaper) is kept under its pid; when the
    /// kernel gives that pid to a child started later, that child's `wait` must get its own exit,
    /// not the kept one. The pid is made to repeat with /proc/sys/kernel/ns_last_pid.
    @Test(.enabled(if: geteuid() == 0, "needs root: sets /proc/sys/kernel/ns_last_pid"))
    func aKeptExitIsNeverGivenToALaterChildWithTheSamePID() async throws {
        guard try await isolated("aKeptExitIsNeverGivenToALaterChildWithTheSamePID") else { return }
        let reaper = ChildReaper()
        for _ in 1..<50 {
            // The earlier process: exits with 0, and nobody waits for it.
            let earlier = try Spawner.spawn(SpawnOptions(executable: "/bin/true", arguments: ["true"]))
            try await eventually("the earlier child reaped") {
                reaper.reapAll()
                return access("/proc/\(earlier)", F_OK) != 0
            }
            // The next fork takes the same pid (unless something else forks first: try again).
            try WholeFile.write("/proc/sys/kernel/ns_last_pid", Array(String(earlier - 1).utf8), mode: 0o644)
            let later = try Spawner.spawn(SpawnOptions(executable: "/bin/sleep", arguments: ["sleep", "30"]))
            guard later == earlier else {
                // Reaped by reapAll like the others: nothing else calls it here, so a wait for it
                // would never return (the test hung whenever another process forked first).
                kill(later, SIGKILL)
                try await eventually("the child with another pid reaped") {
                    reaper.reapAll()
                    return access("/proc/\(later)", F_OK) != 0
                }
                continue
            }
            let waiting = Task { await reaper.wait(later) }
            kill(later, SIGKILL)
            try await eventually("the later child reaped") {
                reaper.reapAll()
                return access("/proc/\(later)", F_OK) != 0
            }
            #expect(await waiting.value == .signaled(SIGKILL), "its own exit, not the earlier process's exit code 0")
            return
        }
        Issue.record("no pid came round again in 50 tries (something else forked each time)")
    }

    @Test func anExitBeforeTheWaitIsKeptForIt() async throws {
        guard try await isolated("anExitBeforeTheWaitIsKeptForIt") else { return }
        let reaper = ChildReaper()
        let child = try Spawner.spawn(SpawnOptions(executable: "/bin/sh", arguments: ["sh", "-c", "exit 7"]))
        try await eventually("the child reaped") {
            reaper.reapAll()
            return access("/proc/\(child)", F_OK) != 0
        }
        #expect(await reaper.wait(child) == .exited(7))
    }
}
