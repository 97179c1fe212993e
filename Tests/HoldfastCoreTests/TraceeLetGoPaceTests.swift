import HoldfastCore
import Testing

/// When the supervisor lets go of a process that made it its tracer: a debugger check's few
/// stops at once, a loop's at a bounded pace, however many processes loop.
struct TraceeLetGoPaceTests {
    let start = ContinuousClock.now
    let limits = TraceeLetGoPace.Limits(freeStops: 3, perProcessInterval: .milliseconds(10), overallInterval: .milliseconds(2))

    @Test func aProcessesFirstStopsAreLetGoAtOnceAndLaterOnesNoCloserThanItsInterval() {
        var pace = TraceeLetGoPace(limits: limits)
        // Three stops in the same instant: free.
        for _ in 0..<3 { #expect(pace.stopped(7, at: start) == nil) }
        // Each later one, however quickly it comes, 10 ms after the last let-go.
        #expect(pace.stopped(7, at: start) == start + .milliseconds(10))
        #expect(pace.stopped(7, at: start + .milliseconds(10)) == start + .milliseconds(20))
        // One that comes late is let go at once.
        #expect(pace.stopped(7, at: start + .milliseconds(45)) == nil)
        #expect(pace.stopped(7, at: start + .milliseconds(46)) == start + .milliseconds(55))
    }

    @Test func anotherProcessKeepsItsFreeStops() {
        var pace = TraceeLetGoPace(limits: limits)
        for _ in 0..<5 { _ = pace.stopped(7, at: start) }
        for _ in 0..<3 { #expect(pace.stopped(8, at: start) == nil, "the offender's pace is its own") }
    }

    @Test func manyOffendersAreHeldNoCloserThanTheOverallInterval() {
        var pace = TraceeLetGoPace(limits: limits)
        let pids: [Int32] = Array(100..<150)
        for pid in pids {
            for _ in 0..<3 { #expect(pace.stopped(pid, at: start) == nil) }
        }
        // Fifty processes past their free stops, all at once: let go 2 ms apart, in order.
        var dues: [ContinuousClock.Instant] = []
        for pid in pids {
            guard let due = pace.stopped(pid, at: start) else {
                Issue.record("pid \(pid) let go at once")
                continue
            }
            dues.append(due)
        }
        #expect(dues.count == 50)
        for (index, due) in dues.enumerated() {
            #expect(due == start + .milliseconds(10) + .milliseconds(2) * index, "held stop \(index)")
        }
    }

    @Test func aPidThatExitedStartsAfreshAndLeavesNoRecord() {
        var pace = TraceeLetGoPace(limits: limits)
        for _ in 0..<6 { _ = pace.stopped(9, at: start) }
        #expect(pace.recordCount == 1)
        pace.exited(9)
        #expect(pace.recordCount == 0)
        // The kernel hands pid 9 to a new process: its debugger check is not held.
        for _ in 0..<3 { #expect(pace.stopped(9, at: start + .milliseconds(1)) == nil) }
    }

    @Test func theStandardLimitsBoundHeldLetGosToTwoHundredASecond() {
        let standard = TraceeLetGoPace.Limits.standard
        #expect(standard.freeStops == 16 && standard.freeStopsPerSecond == 256)
        // The held pace alone: the free stops of the set-up below are not counted against a
        // budget (`freeStopsOfManyProcessesShareOneBudget` is about that).
        var unbudgeted = standard
        unbudgeted.freeStopsPerSecond = 1_000_000
        var pace = TraceeLetGoPace(limits: unbudgeted)
        // 200 processes, each past its free stops, stopping as fast as they can for one second.
        var letGo = 0
        for pid: Int32 in 1...200 {
            for _ in 0..<standard.freeStops { _ = pace.stopped(pid, at: start) }
        }
        var next: [Int32: ContinuousClock.Instant] = [:]
        for pid: Int32 in 1...200 { next[pid] = start }
        let end = start + .seconds(1)
        while let (pid, at) = next.min(by: { $0.value < $1.value }), at < end {
            let due = pace.stopped(pid, at: at) ?? at
            if due < end { letGo += 1 }
            next[pid] = due
        }
        #expect(letGo <= 201, "held let-gos in one second: \(letGo)")
        #expect(letGo >= 195, "the pace holds no more than it must: \(letGo)")
    }

    /// Short-lived processes that each stop their free stops (a loop of forks: each child, an
    /// orphan of the last, calls PTRACE_TRACEME and stops 16 times): at most 256 let go at once
    /// in all, the rest held no closer together than the overall interval. Before, every one of
    /// them was let go at once, however many came.
    @Test func freeStopsOfManyProcessesShareOneBudget() {
        var pace = TraceeLetGoPace()
        var atOnce = 0
        var held: [ContinuousClock.Instant] = []
        for pid: Int32 in 1...100 {
            for _ in 0..<16 {
                if let due = pace.stopped(pid, at: start) { held.append(due) } else { atOnce += 1 }
            }
            pace.exited(pid)
        }
        // 256 free, and the first held one (nothing held before it to be spaced from).
        #expect(atOnce == 257, "let go at once: \(atOnce)")
        #expect(held.count == 1600 - 257)
        #expect(zip(held, held.dropFirst()).allSatisfy { $1 - $0 >= .milliseconds(5) }, "held ones 5 ms apart")
        // A second later the budget is back: a debugger check's stops are free again.
        for _ in 0..<16 { #expect(pace.stopped(500, at: start + .seconds(9)) == nil) }
    }
}
