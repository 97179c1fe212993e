import CHoldfastTestShims
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// A guest process can hold a pipe's lock inside the kernel for as long as it likes: the kernel
/// copies a write(2)'s bytes from the writer's memory (a read(2)'s into the reader's) holding
/// it, and a page that never arrives (here a userfaultfd page; a hung FUSE file's mapping does
/// the same unprivileged) keeps it there. Our non-blocking syscall on that pipe then waits for
/// the lock, uninterruptibly. These tests hold that lock and check that only the stream on that
/// pipe waits: the reactor's watchdog hands the loop to a new thread.
@Suite("Reactor stalls: a syscall stuck in the kernel stops only its own stream", .timeLimit(.minutes(2)))
struct ReactorStallTests {
    /// Kernel-mode userfaultfd faults need CAP_SYS_PTRACE unless the sysctl allows them.
    static let canStallTheKernel: Bool = {
        if geteuid() == 0 { return true }
        let fd = open("/proc/sys/vm/unprivileged_userfaultfd", O_RDONLY)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var byte: UInt8 = 0
        return read(fd, &byte, 1) == 1 && byte == UInt8(ascii: "1")
    }()

    /// Which end of the pipe the adversary holds the lock on.
    enum Adversary: String, CaseIterable, Sendable, CustomTestStringConvertible {
        /// A container writing to its stdout from a page that never arrives: our read waits.
        case writerHoldsOutput
        /// A container reading its stdin into such a page: our write waits.
        case readerHoldsInput

        var testDescription: String { rawValue }
    }

    /// A held pipe lock, released by the test or, so that a failing run ends rather than hangs,
    /// 20 s after it was taken.
    /// `@unchecked`: the page pointer is only handed to the C shim, whose calls the test orders.
    final class HeldLock: @unchecked Sendable {
        let released = NIOLockedValueBox(false)
        private let page: OpaquePointer

        init(writingTo fd: Int32) throws {
            page = try #require(hft_stalled_page_create(), "userfaultfd: errno \(errno)")
            #expect(hft_stalled_page_write_async(page, fd, 4096) == 0)
            #expect(hft_stalled_page_wait_fault(page) == 0)
            armFallback()
        }

        init(readingFrom fd: Int32) throws {
            page = try #require(hft_stalled_page_create(), "userfaultfd: errno \(errno)")
            #expect(hft_stalled_page_read_async(page, fd, 4096) == 0)
            #expect(hft_stalled_page_wait_fault(page) == 0)
            armFallback()
        }

        private func armFallback() {
            Task.detached { [self] in
                try? await Task.sleep(for: .seconds(20))
                release()
            }
        }

        var isReleased: Bool { released.withLockedValue { $0 } }

        /// Lets the adversary's syscall go on, the page filled with "z".
        func release() {
            let first = released.withLockedValue { done -> Bool in
                defer { done = true }
                return !done
            }
            if first { #expect(hft_stalled_page_release(page, UInt8(ascii: "z")) == 0) }
        }

        /// The adversary's syscall result, and the page's first `count` bytes.
        func join(reading count: Int) -> (result: Int, bytes: [UInt8]) {
            let result = hft_stalled_page_join(page)
            let bytes = Array(UnsafeBufferPointer(start: hft_stalled_page_bytes(page), count: count))
            hft_stalled_page_destroy(page)
            return (result, bytes)
        }
    }

    @Test(
        .enabled(if: Self.canStallTheKernel, "needs root (or vm.unprivileged_userfaultfd=1) for a kernel-mode fault"),
        arguments: Adversary.allCases)
    func aStreamWhosePipeLockIsHeldStopsNoOtherStream(adversary: Adversary) async throws {
        let reactor = try Reactor(stallLimit: .milliseconds(100))
        let reports = NIOLockedValueBox<[Reactor.Stall]>([])
        reactor.onStall { report in reports.withLockedValue { $0.append(report) } }

        let victim = try PipeEnds.make()
        let other = try PipeEnds.make()
        let otherReader = try AsyncFD(adopting: other.read, reactor: reactor)
        let otherWriter = try AsyncFD(adopting: other.write, reactor: reactor)
        defer { [otherReader, otherWriter].forEach { $0.close() } }

        // The victim stream's first byte is in the pipe; the adversary then takes the lock.
        var first = UInt8(ascii: "x")
        #expect(write(victim.write, &first, 1) == 1)
        let held: HeldLock
        let stuck: Task<[UInt8], any Error>
        let ours: AsyncFD
        switch adversary {
        case .writerHoldsOutput:
            held = try HeldLock(writingTo: victim.write)
            ours = try AsyncFD(adopting: victim.read, reactor: reactor)
            // Our read of the victim's output: waits for the lock inside the kernel.
            stuck = Task(executorPreference: reactor) { try await readExactly(ours, 1 + 4096) }
        case .readerHoldsInput:
            held = try HeldLock(readingFrom: victim.read)
            ours = try AsyncFD(adopting: victim.write, reactor: reactor)
            // Our write of the victim's input: waits for the lock inside the kernel.
            stuck = Task(executorPreference: reactor) {
                try await send(ours, bytes("more input"))
                return []
            }
        }
        defer { ours.close() }
        try await eventually("the watchdog to take over") { reactor.stalls == 1 }

        // Another stream on the same reactor: its read waits for readiness, which only the
        // reactor's loop reports, and its bytes come while the victim's lock is still held.
        let heard = Task(executorPreference: reactor) { try await readExactly(otherReader, 11) }
        try await Task.sleep(for: .milliseconds(20))
        try await send(otherWriter, bytes("still heard"))
        #expect(try await heard.value == bytes("still heard"))
        #expect(!held.isReleased, "served while the victim's pipe lock was held")

        let report = try #require(reports.withLockedValue { $0.first })
        #expect(report.tookOver && report.strandedThreads == 1)
        let expectedFD = adversary == .writerHoldsOutput ? victim.read : victim.write
        #expect(report.fds == [expectedFD], "the report names the fd")
        #expect(report.kernelFunction != nil, "and where the kernel holds the thread")
        print("the stall, as reported: \(report)")
        #expect(reactor.strandedThreads == 1)

        // Let go: the victim's stream goes on with every byte, and the stuck thread ends.
        held.release()
        switch adversary {
        case .writerHoldsOutput:
            let (written, _) = held.join(reading: 0)
            #expect(written == 4096)
            #expect(try await stuck.value == bytes("x") + [UInt8](repeating: UInt8(ascii: "z"), count: 4096))
            close(victim.write)
        case .readerHoldsInput:
            let (count, page) = held.join(reading: 1)
            #expect(count == 1 && page == bytes("x"), "the adversary read the byte before ours")
            _ = try await stuck.value
            let reader = try AsyncFD(adopting: victim.read, reactor: reactor)
            defer { reader.close() }
            #expect(try await readExactly(reader, 10) == bytes("more input"))
        }
        try await eventually("the stuck thread to end") { reactor.strandedThreads == 0 }
        #expect(reactor.stalls == 1, "one takeover, no spurious ones")

        // The new thread serves as the old one did.
        let again = Task(executorPreference: reactor) { try await readExactly(otherReader, 5) }
        try await send(otherWriter, bytes("again"))
        #expect(try await again.value == bytes("again"))
    }

    /// A process that holds its pipe's lock for less than the job judgment's second, again and
    /// again, would stop every other stream nearly all the time and never be judged: a syscall
    /// found asleep at two of the watchdog's fast samples is taken over. The job judgment is set
    /// out of reach here (30 s), so only the syscall judgment can serve the bystander while the
    /// lock is held; each of three holds is taken over, the victim's bytes exact each time.
    @Test(.enabled(if: Self.canStallTheKernel, "needs root (or vm.unprivileged_userfaultfd=1) for a kernel-mode fault"))
    func aLockHeldAgainAndAgainForLessThanTheStallLimitStopsNoOtherStream() async throws {
        let reactor = try Reactor(stallLimit: .seconds(30), syscallLimit: .milliseconds(20))
        let reports = NIOLockedValueBox<[Reactor.Stall]>([])
        reactor.onStall { report in reports.withLockedValue { $0.append(report) } }
        let other = try PipeEnds.make()
        let otherReader = try AsyncFD(adopting: other.read, reactor: reactor)
        let otherWriter = try AsyncFD(adopting: other.write, reactor: reactor)
        defer { [otherReader, otherWriter].forEach { $0.close() } }

        for round in 1...3 {
            let victim = try PipeEnds.make()
            var first = UInt8(ascii: "x")
            #expect(write(victim.write, &first, 1) == 1)
            let held = try HeldLock(writingTo: victim.write)
            let ours = try AsyncFD(adopting: victim.read, reactor: reactor)
            let stuck = Task(executorPreference: reactor) { try await readExactly(ours, 1 + 4096) }
            // (Fast sampling from round 2 on: taken over within 40 ms, maybe before this sees it.)
            try await eventually("our read of round \(round) to wait for the lock") {
                reactor.stalls >= round
                    || (Reactor.isAsleep(reactor.queue.withLockedValue { $0.runnerTID }) && reactor.syscallInProgress.load(ordering: .relaxed) != 0)
            }
            let line = bytes("heard \(round)")
            let heard = Task(executorPreference: reactor) { try await readExactly(otherReader, line.count) }
            try await send(otherWriter, line)
            #expect(try await withTimeout("the bystander", .seconds(30)) { try await heard.value } == line)
            try #require(!held.isReleased, "round \(round): the bystander was served only when the lock was let go")

            held.release()
            #expect(held.join(reading: 0).result == 4096)
            #expect(try await stuck.value == bytes("x") + [UInt8](repeating: UInt8(ascii: "z"), count: 4096))
            ours.close()
            close(victim.write)
            try await eventually("round \(round)'s stuck thread to end") { reactor.strandedThreads == 0 }
        }
        #expect(reactor.stalls == 3, "each hold taken over once")
        try await eventually("the third report") { reports.withLockedValue { $0.count } == 3 }
        let all = reports.withLockedValue { $0 }
        #expect(all.count == 3 && all.allSatisfy { $0.tookOver && $0.fds.count == 1 })
    }

    /// The syscall judgment without a held lock (and so without root): a syscall of the loop's
    /// asleep is taken over; a job that runs outside any syscall (or inside one that is running,
    /// not asleep) is not — it is no lock's wait, and the job judgment (here out of reach) is its
    /// bound. Each lasts past the watchdog's first (idle, 1 s) sample, which makes the sampling
    /// fast: the busy job is seen at many fast samples.
    @Test func aSyscallAsleepIsTakenOverAndABusyJobIsNot() async throws {
        let reactor = try Reactor(stallLimit: .seconds(30), syscallLimit: .milliseconds(20))
        let pipe = try PipeEnds.make()
        let fd = try AsyncFD(adopting: pipe.read, reactor: reactor)
        defer {
            fd.close()
            close(pipe.write)
        }
        let busy = Task(executorPreference: reactor) {
            var spins = 0
            var end = ContinuousClock.now + .milliseconds(1200)
            while ContinuousClock.now < end { spins &+= 1 }
            end = ContinuousClock.now + .milliseconds(300)
            try fd.withSyscall { while ContinuousClock.now < end { spins &+= 1 } }
            return spins
        }
        #expect(try await busy.value > 0)
        #expect(reactor.stalls == 0, "a busy job is not a lock's wait")

        let asleep = Task(executorPreference: reactor) { try fd.withSyscall { Reactor.sleep(.milliseconds(1300)) } }
        try await asleep.value
        #expect(reactor.stalls == 1, "the sleeping syscall was taken over")
        try await eventually("the stuck thread to end") { reactor.strandedThreads == 0 }
        let served = Task(executorPreference: reactor) { reactor.isCurrent }
        #expect(await served.value, "the new thread runs the loop")
    }

    /// The judgment itself, tick by tick: one syscall, asleep at two timely samples in a row.
    @Test func theSyscallJudgmentWantsOneSyscallAsleepAtTwoTimelySamples() {
        typealias Sample = Reactor.SyscallJudge.Sample
        var judge = Reactor.SyscallJudge()
        func tick(_ sample: Sample?, asleep: Bool = true, late: Bool = false, stranded: Int = 0) -> Sample? {
            judge.tick(inSyscall: sample, asleep: asleep, late: late, stranded: stranded, maxStranded: 4)
        }
        let a = Sample(runner: 0, syscall: 7)
        #expect(tick(a) == nil, "one sample judges nothing")
        #expect(tick(a) == a, "the same syscall asleep at the next")
        let b = Sample(runner: 0, syscall: 8)
        #expect(tick(b) == nil, "another one")
        #expect(tick(b, late: true) == nil, "a late tick")
        #expect(tick(b) == nil, "starts over")
        #expect(tick(b, stranded: 4) == nil, "the limit")
        #expect(tick(b, stranded: 3) != nil)
        judge.reset()
        let c = Sample(runner: 1, syscall: 8)
        #expect(tick(c) == nil, "after a reset")
        #expect(tick(c, asleep: false) == nil, "running at the second sample")
        #expect(tick(c) == nil, "running at the first: not asleep all along")
        #expect(tick(c) == c)
        #expect(tick(nil) == nil)
        #expect(tick(nil) == nil, "no syscall, nothing")
    }

    /// The watchdog samples fast only while the loop was seen busy: an idle broker wakes once a
    /// second.
    @Test func theWatchdogSamplesFastOnlyAfterSeeingTheLoopBusy() {
        var pace = Reactor.WatchPace(slow: .seconds(1), fast: .milliseconds(20))
        let start = ContinuousClock.now
        #expect(pace.interval(at: start) == .seconds(1))
        pace.sawBusy(at: start)
        #expect(pace.interval(at: start + .seconds(1)) == .milliseconds(20))
        #expect(pace.interval(at: start + Reactor.WatchPace.busyLinger) == .seconds(1))
    }

    /// Beyond `maxStrandedThreads` the watchdog starts no thread: it reports once, and the loop
    /// goes on when the stuck thread comes back. Bounded: a guest cannot make the broker spawn
    /// threads without end.
    @Test(.enabled(if: Self.canStallTheKernel, "needs root (or vm.unprivileged_userfaultfd=1) for a kernel-mode fault"))
    func strandedThreadsAreBounded() async throws {
        let reactor = try Reactor(stallLimit: .milliseconds(100), maxStrandedThreads: 1)
        let reports = NIOLockedValueBox<[Reactor.Stall]>([])
        reactor.onStall { report in reports.withLockedValue { $0.append(report) } }
        var pipes: [PipeEnds] = []
        var locks: [HeldLock] = []
        var readers: [AsyncFD] = []
        var reads: [Task<[UInt8], any Error>] = []
        for round in 0..<2 {
            let pipe = try PipeEnds.make()
            var first = UInt8(ascii: "x")
            #expect(write(pipe.write, &first, 1) == 1)
            locks.append(try HeldLock(writingTo: pipe.write))
            let reader = try AsyncFD(adopting: pipe.read, reactor: reactor)
            readers.append(reader)
            pipes.append(pipe)
            reads.append(Task(executorPreference: reactor) { try await readExactly(reader, 1 + 4096) })
            try await eventually("report \(round + 1)") { reports.withLockedValue { $0.count } == round + 1 }
        }
        let all = reports.withLockedValue { $0 }
        #expect(all.map(\.tookOver) == [true, false])
        #expect(reactor.stalls == 1 && reactor.strandedThreads == 1)
        try await Task.sleep(for: .milliseconds(500))
        #expect(reports.withLockedValue { $0.count } == 2, "the limit is reported once")

        for (lock, read) in zip(locks, reads) {
            lock.release()
            #expect(lock.join(reading: 0).result == 4096)
            #expect(try await read.value == bytes("x") + [UInt8](repeating: UInt8(ascii: "z"), count: 4096))
        }
        try await eventually("the stuck thread to end") { reactor.strandedThreads == 0 }
        readers.forEach { $0.close() }
        pipes.forEach { close($0.write) }
    }
}

@Suite("A process's run state, from /proc")
struct ProcessRunStateTests {
    /// A tracing stop (`t`) with no tracer is a process being let go, not one stopped: a
    /// SIGCONT sent on that word came before the SIGSTOP it was let go with, and was lost.
    @Test func aTracingStopWithNoTracerIsNotAStop() {
        let never: () -> ProcessRunState = { .gone }
        #expect(ProcessRunState.judged(leader: "t", tracer: 0, dying: never) == .running)
        #expect(ProcessRunState.judged(leader: "t", tracer: 77, dying: never) == .traced(by: 77))
        #expect(ProcessRunState.judged(leader: "T", tracer: 0, dying: never) == .stopped)
        #expect(ProcessRunState.judged(leader: "T", tracer: 77, dying: never) == .traced(by: 77))
        #expect(ProcessRunState.judged(leader: "S", tracer: 0, dying: never) == .running)
        #expect(ProcessRunState.judged(leader: "Z", tracer: 0, dying: { .dying(waitingIn: nil) }) == .dying(waitingIn: nil))
    }

    @Test func theStateIsTheFieldAfterTheCommandsLastParenthesis() {
        #expect(ProcessRunState.state(ofStatLine: "4242 (holdfast) S 1 4242 4242 0 -1") == "S")
        #expect(ProcessRunState.state(ofStatLine: "4242 (a (b) c) T 1 4242") == "T", "a command with parentheses and spaces")
        #expect(ProcessRunState.state(ofStatLine: "garbage") == nil)
        #expect(ProcessRunState.tracerPID(inStatus: "Name:\tholdfast\nState:\tt (tracing stop)\nTracerPid:\t4711\nUid:\t0\n") == 4711)
        #expect(ProcessRunState.tracerPID(inStatus: "Name:\tholdfast\nTracerPid:\t0\n") == 0)
        #expect(ProcessRunState.tracerPID(inStatus: "Name:\tholdfast\n") == nil)
    }

    @Test func thisProcessRunsAndANonexistentOneIsGone() {
        #expect(ProcessRunState.of(getpid()) == .running)
        #expect(ProcessRunState.of(Int32.max) == .gone)
    }
}
