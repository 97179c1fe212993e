import HoldfastPosix
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A test's signal to a process it saw must never reach another process the kernel gave the
/// pid since: a deferred `kill(pid, SIGCONT)` once continued another test's stopped broker.
@Suite("PinnedProcess: a signal reaches the process seen, or no one", .timeLimit(.minutes(2)))
struct PinnedProcessTests {
    @Test(.enabled(if: geteuid() == 0, "needs root: sets /proc/sys/kernel/ns_last_pid"))
    func aSignalToAProcessThatIsGoneNeverReachesTheNextHolderOfItsPID() async throws {
        let processes = TestProcesses()
        defer { processes.killAll() }
        // The pid comes round only if nothing else forks between the write and the start: a
        // full suite forks all the time, so try for a while (bounded), not a fixed few times.
        let deadline = ContinuousClock.now + .seconds(30)
        var tries = 0
        while ContinuousClock.now < deadline {
            tries += 1
            let first = try processes.start(["sleep", "30"])
            let seen = try #require(PinnedProcess(first))
            processes.kill(first)  // SIGKILL and reaped: the pid is free
            try WholeFile.write("/proc/sys/kernel/ns_last_pid", Array(String(first - 1).utf8), mode: 0o644)
            let second = try processes.start(["sleep", "30"])
            guard second == first else {
                processes.kill(second)
                continue  // something else forked first: again
            }
            #expect(!seen.signal(SIGKILL), "refused: the process seen is gone")
            #expect(ProcessIdentity(second)?.isAlive == true, "the process that got its pid is untouched")
            #expect(try #require(PinnedProcess(second)).signal(SIGKILL), "and a signal to it as pinned now reaches it")
            #expect(try await processes.wait(second) == .signaled(SIGKILL))
            return
        }
        Issue.record("no pid came round again in \(tries) tries over 30 s (something else forked each time)")
    }
}
