import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import HoldfastTools
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `host run` never waits for what cannot come: with `host serve` and a real daemon, in each
/// way a stream can end without END or an exit can go missing, the client ends — with the
/// process's code when host serve learnt it, 125 and a one-line reason when the process was lost.
/// Every wait is a hang bound; every process a test starts (the guest's orphans included) is
/// ended by pid.
@Suite("host run ends whatever happens to the guest", .serialized, .timeLimit(.minutes(10)))
struct HostRunEndsTests {
    /// A process that backgrounds a child holding its stdout: the guest reports the exit after
    /// its own drain timeout, then host serve ends the silent streams after `--drain-timeout`.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func anOrphanHoldingStdoutDoesNotHoldHostRun() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let run = try serve.startRun(["sh", "-c", "sleep 1000 & echo $!; exit 6"], options: ["--id", "parent", "--drain-timeout", "1s"])
        let orphan = try await printedPID(run)
        defer { killOrphan(orphan) }
        let result = try await run.finish()
        #expect(result.status == .exited(6), "the process's own code: \(result.err)")
        #expect(result.out == "\(orphan)\n")
        #expect(result.err.contains("stdout and stderr had no end from the guest within the drain timeout (1s)"), "\(result.err)")
        // host serve's line may reach its log a moment after its answer: waited for.
        try await eventually("host serve's line for the exit") { serve.log.contains("process parent exited: code 6") }
        #expect(kill(orphan, 0) == 0, "the orphan itself is not host run's business (ended here, by pid)")
    }

    /// The supervisor killed with SIGKILL, then started again as its service manager would: the
    /// new daemon's hello has a new instance id, so the process is lost — and says so.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func aKilledSupervisorsProcessIsLostWhenTheDaemonComesBack() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let run = try serve.startRun(["sh", "-c", "echo $$; exec sleep 1000"], options: ["--id", "stranded", "--drain-timeout", "1s"])
        let stranded = try await printedPID(run)
        defer { killOrphan(stranded) }

        let supervisor = daemon.daemonPID
        kill(supervisor, SIGKILL)
        _ = try await daemon.processes.wait(supervisor, timeout: .seconds(30))
        try await daemon.startAgain()
        let result = try await run.finish()
        #expect(result.status == .exited(HostExitCode.holdfastFailure), "\(result.err)")
        #expect(result.err.hasPrefix("holdfast host run: lost: the guest's daemon restarted (instance "), "\(result.err)")
        #expect(result.err.split(separator: "\n").count == 1, "one line: \(result.err)")
        try await eventually("host serve's line for the new daemon's hello") { serve.hellos >= 2 }
        #expect(serve.hellos == 2)
        try await eventually("host serve's line for the lost process") { serve.log.contains("process stranded lost: the guest's daemon restarted") }
        print("supervisor killed: host run ended \(result.status): \(result.err)", terminator: "")
    }

    /// The daemon stopped (SIGTERM) and started again, under a plain process and one whose
    /// orphan holds its stdout. Each host run ends with the exit the stop reported (143): the
    /// stop reports both (the second after its orphan's process group is killed at the end of
    /// the grace), the guest's side of issue 13, checked here through host serve. (Had the stop
    /// not reported one, its host run would end 125 once the new daemon's hello showed it lost.)
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func aDaemonRestartEndsEveryHostRunWithWhatHostServeLearnt() async throws {
        // A shutdown timeout of 30 s: the fixture's 5 s left the drains 3.75 s after the SIGTERM
        // and the host's acknowledgements 1.25 s, which a loaded machine's stop could outlast
        // (the held process's exit comes only after the grace's kill of its orphan) and lose an
        // exit the test asserts. The stop itself takes the 1 s grace and its drains, no more.
        let daemon = try await DaemonFixture(shutdown: ("1s", "30s"))
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let plain = try serve.startRun(["sh", "-c", "echo $$; exec sleep 1000"], options: ["--id", "plain", "--drain-timeout", "1s"])
        let held = try serve.startRun(["sh", "-c", "sleep 1000 & echo $!; wait"], options: ["--id", "held", "--drain-timeout", "1s"])
        let plainPID = try await printedPID(plain)
        let orphan = try await printedPID(held)
        defer {
            killOrphan(plainPID)
            killOrphan(orphan)
        }

        #expect(try await daemon.stop() == .exited(0))
        try await daemon.startAgain()
        for (id, run) in [("plain", plain), ("held", held)] {
            let result = try await run.finish()
            // On failure, the daemon's stop as it logged it (from the SIGTERM to the next start).
            let lines = daemon.log.split(separator: "\n")
            let stop = lines.drop { !$0.contains("shutting down") }.prefix { !$0.contains("holdfast daemon started") }
            // A stop reports every exit it causes (Supervisor.complete queues the exit before it
            // wakes the stop's wait): host run ends with the process's own 143, not 125 and "lost".
            #expect(result.status == .exited(128 + SIGTERM),
                "\(id): the stop did not report its exit: \(result.err); the daemon's stop:\n\(stop.prefix(40).joined(separator: "\n"))")
            // And host serve says so (its line may reach its log a moment after the answer).
            try await eventually("host serve's line for \(id)'s exit") { serve.log.contains("process \(id) exited: code 143") }
        }
    }

    /// The broker killed with SIGKILL: the supervisor holds the process's pipes, so the process
    /// never sees SIGPIPE; the restarted broker takes the streams over, and host run gets the
    /// rest of the output and ends with the process's own code. (Before issue 16 the process
    /// died of SIGPIPE at its next write.) Lines the crash took are whole lines: the ring held
    /// whole writes.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func aKilledBrokerEndsHostRunWithTheProcesssCode() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let ticks = 60
        let run = try serve.startRun(
            ["sh", "-c", "i=0; while [ $i -lt \(ticks) ]; do echo tick || exit 3; sleep 0.05; i=$((i+1)); done"],
            options: ["--id", "ticker", "--drain-timeout", "5s"])
        try await eventually("ticks through host run") { run.out.contains("tick\ntick\n") }
        let broker = try #require(try await daemon.rolePID("broker"))
        let killedBroker = ProcessIdentity(broker)
        kill(broker, SIGKILL)
        try await eventually("the broker back") { try await daemon.roleIsAnother("broker", than: killedBroker) }
        let result = try await run.finish()
        #expect(result.status == .exited(0), "the process never saw SIGPIPE: \(result.err)")
        try await eventually("host serve's line for the exit") { serve.log.contains("process ticker exited: code 0") }
        let lines = result.out.split(separator: "\n", omittingEmptySubsequences: false).dropLast()
        #expect(Set(lines) == ["tick"], "whole lines only")
        #expect(lines.count <= ticks && lines.count >= ticks - 5, "\(lines.count) of \(ticks) ticks")
        print("broker killed under host run: \(lines.count) of \(ticks) ticks arrived")
    }

    /// `host serve` leaked three Unix sockets per `host run` (16 → 606 fds after 200). Now a
    /// thousand runs of `true` (eight at a time, through host serve's control socket as `host
    /// run` does) leave its fds where they were, and its memory near.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func hostServesFdsReturnToBaselineAfterAThousandRuns() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let atStart = descriptorsButTimers(of: serve.pid)
        let null = (input: open("/dev/null", O_RDONLY | O_CLOEXEC), output: open("/dev/null", O_WRONLY | O_CLOEXEC))
        defer {
            close(null.input)
            close(null.output)
        }
        let stdio = HostClient.Stdio(input: null.input, output: null.output, error: null.output)
        @Sendable func runs(_ count: Int, from first: Int) async throws -> [HostRunOutcome] {
            try await withThrowingTaskGroup(of: HostRunOutcome.self) { group in
                var outcomes: [HostRunOutcome] = []
                for index in first..<(first + count) {
                    if index - first >= 8, let outcome = try await group.next() { outcomes.append(outcome) }
                    group.addTask {
                        try await HostClient.run(control: serve.control, request: HostRunRequest(id: "t\(index)", argv: ["true"]), stdio: stdio)
                    }
                }
                for try await outcome in group { outcomes.append(outcome) }
                return outcomes
            }
        }
        func settled(at baseline: Int) async throws {
            try await eventually("host serve's fds back to \(baseline)") { descriptorsButTimers(of: serve.pid) <= baseline }
        }

        // A few runs first: the reactor, timers and pools host serve starts once.
        #expect(try await runs(20, from: 0).allSatisfy { $0.exitCode == 0 })
        try await Task.sleep(for: .milliseconds(500))
        let baseline = descriptorsButTimers(of: serve.pid)
        let before = try await HostClient.stats(control: serve.control)
        let memoryBefore = residentKiB(serve.pid)
        let count = getenv("HOLDFAST_HOST_RUNS").flatMap { Int(String(cString: $0)) } ?? 1000
        let started = ContinuousClock.now
        let outcomes = try await withTimeout("\(count) runs", .seconds(600)) { try await runs(count, from: 20) }
        let took = ContinuousClock.now - started
        let peak = descriptorsButTimers(of: serve.pid)
        #expect(outcomes.count == count)
        #expect(outcomes.allSatisfy { $0.exitCode == 0 }, "\(outcomes.filter { $0.exitCode != 0 }.prefix(3))")
        try await settled(at: baseline)
        let settledFDs = descriptorsButTimers(of: serve.pid)
        // Settled: no process, no stream held; malloc trimmed after a second idle.
        try await eventually("host serve holding nothing") {
            let stats = try await HostClient.stats(control: serve.control)
            return stats.processes == 0 && stats.streams == 0
        }
        try await Task.sleep(for: .seconds(2))
        let after = try await HostClient.stats(control: serve.control)
        let memoryAfter = residentKiB(serve.pid)
        print("host serve after \(count) runs of true (\(took)): fds \(atStart) at start, \(baseline) after 20 runs, \(peak) right after, "
            + "\(settledFDs) settled; heap in use \(before.heapInUse / 1024) -> \(after.heapInUse / 1024) KiB; "
            + "resident \(memoryBefore) -> \(memoryAfter) KiB; outcomes kept \(after.rememberedOutcomes), exit ids kept \(after.rememberedExits)")
        #expect(settledFDs <= baseline, "\(descriptorTable(pid: serve.pid))")
        #expect(after.processes == 0 && after.streams == 0)
        // What stays is bounded: the last 1,024 outcomes and the exit ids the bridge keeps
        // against repeats (4,096 at most). A run's streams, relays and sockets (kilobytes each)
        // are gone: 1,000 of them would be megabytes. The slack (256 KiB) is the allocator's
        // under a loaded suite (a full suite's run kept 1.12 MB where the test alone kept 0.98;
        // with the state directory each outcome also keeps its directory's number).
        let retained = after.heapInUse - before.heapInUse
        #expect(retained < 1024 * min(count, HostService.rememberedOutcomes) + 256 * 1024, "\(retained) bytes of heap kept after \(count) runs")
    }
}

/// A process's open fds but the concurrency runtime's timer fds, which it opens and closes as it
/// needs them, at moments no test chooses (as `ownDescriptorCount` filters them): one opened
/// after the baseline was read would hold a count that never comes back down.
private func descriptorsButTimers(of pid: pid_t) -> Int {
    descriptorTable(pid: pid).values.filter { $0 != "anon_inode:[timerfd]" }.count
}

/// The first line a `host run` prints: a pid its command echoed.
private func printedPID(_ run: HostRunClient) async throws -> pid_t {
    var pid: pid_t?
    try await eventually("the pid on host run's stdout") {
        pid = run.out.split(separator: "\n").first.flatMap { pid_t($0) }
        return pid != nil
    }
    return pid!
}
