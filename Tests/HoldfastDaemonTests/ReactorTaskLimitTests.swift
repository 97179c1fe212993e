@testable import HoldfastPosix
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The reactor's takeover when the system has no task to give (a container forked up to
/// `threads-max` or `pids.max`): the loop goes on, on the thread made for it ahead.
@Suite("A takeover with no thread to be had", .timeLimit(.minutes(2)))
struct ReactorTaskLimitTests {
    /// A syscall of the loop's asleep 5 s while this process may make no new thread (its pids
    /// cgroup full): it is taken over by the spare thread made at the reactor's start, and a job
    /// queued during the hold is served within it. Before, the takeover superseded the stuck
    /// thread and then tried to make one, failing every 10 ms: the stuck one, back from its
    /// syscall, went away, and nothing ran the loop until a task came free — every stream of
    /// the broker stopped.
    @Test(.enabled(if: PidsLimit.available, "needs root and a pids cgroup controller"))
    func aTakeoverWithNoThreadToBeHadStillServesTheLoop() async throws {
        guard try await isolated("aTakeoverWithNoThreadToBeHadStillServesTheLoop", timeout: .seconds(60)) else { return }
        let reactor = try Reactor(stallLimit: .seconds(30), syscallLimit: .milliseconds(20))
        let reports = NIOLockedValueBox<[Reactor.Stall]>([])
        reactor.onStall { report in reports.withLockedValue { $0.append(report) } }
        let pipe = try PipeEnds.make()
        let fd = try AsyncFD(adopting: pipe.read, reactor: reactor)
        // The pool's threads and the reactor's spare made while threads may still be had.
        try await eventually("the reactor's spare thread") { reactor.hasSpareThread }
        await withTaskGroup(of: Void.self) { group in for _ in 0..<8 { group.addTask { try? await Task.sleep(for: .milliseconds(20)) } } }
        let limit = try PidsLimit()
        try limit.add(getpid())
        defer {
            try? limit.set("max")
            limit.remove()
        }
        let current = String(decoding: readFile("\(limit.path)/pids.current") ?? [], as: UTF8.self).filter(\.isNumber)
        try limit.set(current.isEmpty ? "1" : current)

        // Whether the held syscall is back: a job that runs while it is not was served by the
        // takeover, not by the stuck thread after its hold (which no time is asserted for).
        let holdEnded = NIOLockedValueBox(false)
        let asleep = Task(executorPreference: reactor) {
            try fd.withSyscall {
                Reactor.sleep(.seconds(5))
                holdEnded.withLockedValue { $0 = true }
            }
        }
        // Queued while the loop's thread sleeps: served by the spare within the hold.
        try await Task.sleep(for: .milliseconds(300))
        let served = Task(executorPreference: reactor) { (onTheLoop: reactor.isCurrent, afterTheHold: holdEnded.withLockedValue { $0 }) }
        let job = try await withTimeout("a job served during the hold", .seconds(5)) { await served.value }
        #expect(job.onTheLoop)
        // The limit only as long as it must last: under it this very process's pool cannot
        // grow again once idle threads went (a fresh clone's loaded run hung so).
        try limit.set("max")
        try await withTimeout("the sleeping syscall's end", .seconds(10)) { try await asleep.value }
        #expect(reactor.stalls == 1, "taken over")
        #expect(!job.afterTheHold, "served within the hold, not after it")
        // (The put-off report when no thread at all can be made is not driven here: once the
        // limit is lifted the watchdog may make its next spare at any moment, and under the
        // limit this process's own pool cannot grow — a fresh clone's loaded run hung or raced.)
        try await eventually("the stuck thread's end") { reactor.strandedThreads == 0 }
        let after = Task(executorPreference: reactor) { reactor.isCurrent }
        #expect(try await withTimeout("a job after the hold", .seconds(10)) { await after.value })
        try? limit.set("max")
        fd.close()
        close(pipe.write)
    }
}
