import Testing

@testable import HoldfastPosix

/// The reactor watchdog's judgment, tick by tick, without threads or a clock: what the loop
/// runs at a tick against what it ran at the one before.
@Suite("The watchdog's judgment of a stuck job")
struct StallJudgeTests {
    typealias Job = Reactor.StallJudge.Job

    @Test func aJobRunningAtTwoTicksInARowIsTakenOverAndAnotherIsNot() {
        var judge = Reactor.StallJudge(maxStrandedThreads: 4)
        let stuck = Job(runner: 1, started: 10)
        #expect(judge.tick(running: stuck, late: false, stranded: 0) == .nothing, "first seen")
        #expect(judge.tick(running: stuck, late: false, stranded: 0) == .takeOver, "still there a tick later")
        // The next thread's first job: judged afresh.
        let next = Job(runner: 2, started: 20)
        #expect(judge.tick(running: next, late: false, stranded: 1) == .nothing)
        // Jobs that come and go between ticks are never taken over.
        #expect(judge.tick(running: Job(runner: 2, started: 21), late: false, stranded: 1) == .nothing)
        #expect(judge.tick(running: nil, late: false, stranded: 1) == .nothing)
        #expect(judge.tick(running: Job(runner: 2, started: 22), late: false, stranded: 1) == .nothing)
    }

    /// A tick that comes late (the process stopped, the VM paused) judges nothing: every thread
    /// stood still alike, so the job it finds has not shown it is stuck.
    @Test func aLateTickJudgesNothingAndTheNextStartsOver() {
        var judge = Reactor.StallJudge(maxStrandedThreads: 4)
        let job = Job(runner: 1, started: 10)
        #expect(judge.tick(running: job, late: false, stranded: 0) == .nothing)
        #expect(judge.tick(running: job, late: true, stranded: 0) == .nothing, "late: not judged")
        #expect(judge.tick(running: job, late: false, stranded: 0) == .nothing, "starts over after a late tick")
        #expect(judge.tick(running: job, late: false, stranded: 0) == .takeOver)
    }

    /// At the limit of stuck threads the stuck job is reported once, however the ticks come —
    /// late ones between (a loaded guest) included. Before, a late tick reset the flag and the
    /// same job was reported again (the full suite saw 3 reports for 2 stuck jobs).
    @Test func atTheLimitAStuckJobIsReportedOnceWhateverTheTicks() {
        var judge = Reactor.StallJudge(maxStrandedThreads: 2)
        let stuck = Job(runner: 3, started: 30)
        var verdicts: [Reactor.StallJudge.Verdict] = []
        for late in [false, false, false, true, false, false, true, true, false, false, false] {
            verdicts.append(judge.tick(running: stuck, late: late, stranded: 2))
        }
        #expect(verdicts.filter { $0 == .reportLimit }.count == 1, "\(verdicts)")
        #expect(!verdicts.contains(.takeOver), "no thread beyond the limit")
        // Another stuck job (the first came back, a new one stuck) is reported in its turn.
        let another = Job(runner: 3, started: 31)
        #expect(judge.tick(running: another, late: false, stranded: 2) == .nothing)
        #expect(judge.tick(running: another, late: false, stranded: 2) == .reportLimit)
        // Below the limit again: taken over.
        let third = Job(runner: 3, started: 32)
        #expect(judge.tick(running: third, late: false, stranded: 1) == .nothing)
        #expect(judge.tick(running: third, late: false, stranded: 1) == .takeOver)
    }
}
