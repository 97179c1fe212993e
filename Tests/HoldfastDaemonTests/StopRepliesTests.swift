import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A daemon stop writes every reply the bridge worker owes the host before it stops the worker.
/// Before, the stop's SIGTERM ended the worker with whatever it had not written: a create
/// answered as the stop came (a runc create the drains' end failed, in about half the runs) never
/// reached the host, which waited for the guest until its own timeout (`no-guest` after 30 s) —
/// or sent the create again to the next daemon.
@Suite("A stop writes the replies it owes", .serialized, .timeLimit(.minutes(2)))
struct StopRepliesTests {
    /// The worker holds its reply to a create for a second (the debug-build failpoint
    /// `bridge-reply-late`, as a worker starved of CPU or a host connection with full buffers
    /// would), and the stop comes meanwhile: the create's answer still reaches the host, and the
    /// process's exit (its trap's 7) once.
    @Test(.enabled(if: DaemonFixture.canRun && Failpoint.compiledIn, "needs root and a debug build (a failpoint holds the reply)"))
    func aCreatesReplyTheWorkerHoldsWhenTheStopComesReachesTheHost() async throws {
        let gate = try FailpointGate()
        defer { gate.remove() }
        let daemon = try await DaemonFixture(
            environment: gate.environment.merging(["HOLDFAST_FAILPOINT": "\(Failpoint.bridgeReplyLate):create"]) { $1 }, shutdown: ("2s", "10s"))
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let trapped = daemon.directory.file("trapped")
        let create = Task {
            try await daemon.bridge.create(
                ProcessSpec(id: "late", argv: ["sh", "-c", "trap 'exit 7' TERM; touch \(trapped); while :; do sleep 0.05; done"]),
                timeout: .seconds(15))
        }
        // Started, its reply held by the worker: the stop comes now, and the reply is let go
        // once the daemon has begun it.
        try await eventually("the process's trap set") { access(trapped, F_OK) == 0 }
        let supervisor = daemon.daemonPID
        #expect(kill(supervisor, SIGTERM) == 0)
        try await daemon.waitForLog("shutting down")
        try gate.open()
        let status = try await daemon.processes.wait(supervisor, timeout: .seconds(30))
        #expect(status == .exited(0))
        // A reply lost with the worker fails the create at the host's own timeout (15 s): a
        // failure, whatever the time it took.
        let answer = await create.result
        print("a create whose reply the worker held as the stop came: \(answer)")
        if case .failure(let error) = answer { Issue.record("the create's reply was lost with the worker: \(error); \(daemon.log.suffix(2000))") }
        try await eventually("the exit reported") { exits.count("late") == 1 }
        #expect(exits.all.map(\.exitCode) == [7], "\(exits.all)")
        #expect(!daemon.log.contains("did not say it wrote every reply"), "\(daemon.log.suffix(2000))")
    }
}

/// A create the stopping daemon failed: answered `shutting-down`, by the daemon — not the
/// host's own timeout (`no-guest`), as when the answer was lost. The code says which; no time
/// is asserted (a loaded machine's stop may take seconds).
func expectAnsweredShuttingDown(_ answer: Result<Int32, any Error>) {
    switch answer {
    case .success: Issue.record("the create succeeded: \(answer)")
    case .failure(let error): #expect((error as? HoldfastError)?.code == .shuttingDown, "\(error)")
    }
}

