import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// A `wait`, bounded: a lost exit (a waiter never resumed) fails the test in 10 s instead of
/// hanging it.
private func bounded(_ wait: @escaping @Sendable () async -> HoldfastPosix.ExitStatus) async throws -> HoldfastPosix.ExitStatus {
    let result = NIOLockedValueBox<HoldfastPosix.ExitStatus?>(nil)
    Task { let status = await wait(); result.withLockedValue { $0 = status } }
    try await eventually("the exit handed to its waiter", timeout: .seconds(10)) { result.withLockedValue { $0 } != nil }
    return result.withLockedValue { $0 }!
}

/// Reaps until `pid` is gone from /proc (bounded by `eventually`): the reaper's own loop, as a
/// SIGCHLD would run it.
private func reapUntilGone(_ reaper: ChildReaper, _ pid: pid_t, _ what: String) async throws {
    try await eventually(what) {
        reaper.reapAll()
        return access("/proc/\(pid)", F_OK) != 0
    }
}

/// Whether `pid` is a process that has not exited: /proc/PID exists and is not a zombie (a
/// killed child not reaped yet answers kill(pid, 0) too).
private func isRunning(_ pid: pid_t) -> Bool {
    guard let stat = readFile("/proc/\(pid)/stat"), let close = stat.lastIndex(of: UInt8(ascii: ")")), stat.count > close + 2 else { return false }
    return stat[close + 2] != UInt8(ascii: "Z")
}

@Suite("ChildReaper: every exit to its own waiter", .timeLimit(.minutes(5)))
struct ChildReaperTests {
    /// Exits are collected in batches, the lock given back and each batch's waiters woken before
    /// the next: the lock is what every fork, signal and exit wait takes, and a process making
    /// children faster than they were reaped (`clone(CLONE_PARENT)` in a loop) held it — and
    /// every waiter — for as long as it went on. 200 zombies: at least three batches, the lock
    /// free between them, every exit to its own waiter.
    @Test func exitsAreReapedInBatchesWithTheLockGivenBackBetween() async throws {
        guard try await isolated("exitsAreReapedInBatchesWithTheLockGivenBackBetween") else { return }
        let pauses = NIOLockedValueBox(0)
        let box = NIOLockedValueBox<ChildReaper?>(nil)
        let reaper = ChildReaper(betweenBatches: {
            // Takes the reaper's lock: held across the batches, this would never return.
            _ = box.withLockedValue { $0 }?.isOrWasChild(getpid(), within: .seconds(1))
            pauses.withLockedValue { $0 += 1 }
        })
        box.withLockedValue { $0 = reaper }
        let count = 200
        var children: [ChildReaper.Child] = []
        for _ in 0..<count { children.append(try reaper.spawn(SpawnOptions(executable: "/bin/true", arguments: ["true"]))) }
        try await eventually("every child exited, none reaped") {
            children.allSatisfy { access("/proc/\($0.pid)", F_OK) == 0 && !isRunning($0.pid) }
        }
        reaper.reapAll()
        #expect(pauses.withLockedValue { $0 } >= count / ChildReaper.reapBatch, "between batches of \(ChildReaper.reapBatch)")
        for child in children {
            #expect(try await bounded { await reaper.wait(child) } == .exited(0))
        }
    }

    /// Who sent the supervisor a signal is looked up after it was sent: a child that exited at
    /// once may already be reaped. It is still known as a child within the window, and only then.
    @Test func aChildReapedAMomentAgoIsStillKnownAsOne() async throws {
        guard try await isolated("aChildReapedAMomentAgoIsStillKnownAsOne") else { return }
        let reaper = ChildReaper()
        let child = try Spawner.spawn(SpawnOptions(executable: "/bin/sleep", arguments: ["sleep", "30"]))
        #expect(reaper.isOrWasChild(child, within: .seconds(5)), "alive")
        kill(child, SIGKILL)
        try await reapUntilGone(reaper, child, "the child reaped")
        #expect(reaper.isOrWasChild(child, within: .seconds(5)), "reaped a moment ago")
        try await Task.sleep(for: .milliseconds(20))
        #expect(!reaper.isOrWasChild(child, within: .milliseconds(10)), "reaped longer ago than the window")
        #expect(!reaper.isOrWasChild(getppid(), within: .seconds(5)), "this process's parent is not its child")
    }

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
            try await reapUntilGone(reaper, earlier, "the earlier child reaped")
            // The next fork takes the same pid (unless something else forks first: try again).
            try WholeFile.write("/proc/sys/kernel/ns_last_pid", Array(String(earlier - 1).utf8), mode: 0o644)
            let later = try Spawner.spawn(SpawnOptions(executable: "/bin/sleep", arguments: ["sleep", "30"]))
            guard later == earlier else {
                // Reaped by reapAll like the others: nothing else calls it here, so a wait for it
                // would never return (the test hung whenever another process forked first).
                kill(later, SIGKILL)
                try await reapUntilGone(reaper, later, "the child with another pid reaped")
                continue
            }
            let waiting = Task { await reaper.wait(later) }
            kill(later, SIGKILL)
            try await reapUntilGone(reaper, later, "the later child reaped")
            #expect(await waiting.value == .signaled(SIGKILL), "its own exit, not the earlier process's exit code 0")
            return
        }
        Issue.record("no pid came round again in 50 tries (something else forked each time)")
    }

    @Test func anExitBeforeTheWaitIsKeptForIt() async throws {
        guard try await isolated("anExitBeforeTheWaitIsKeptForIt") else { return }
        let reaper = ChildReaper()
        let child = try Spawner.spawn(SpawnOptions(executable: "/bin/sh", arguments: ["sh", "-c", "exit 7"]))
        try await reapUntilGone(reaper, child, "the child reaped")
        #expect(await reaper.wait(child) == .exited(7))
    }

    /// The daemon's case (a full test run lost two exits so): a registered child exits and is
    /// reaped before its watcher asks, the kernel gives its pid to the next child at once, and
    /// that one exits too before anyone asks. Each watcher gets its own child's exit, in either
    /// order. (By pid alone, the first `wait` found a child of ours under the pid, dropped the
    /// kept exit as stale and took the second child's; the second waited for ever.)
    @Test(.enabled(if: geteuid() == 0, "needs root: sets /proc/sys/kernel/ns_last_pid"))
    func twoChildrenGivenOnePIDInTurnEachGetTheirOwnExit() async throws {
        guard try await isolated("twoChildrenGivenOnePIDInTurnEachGetTheirOwnExit") else { return }
        let reaper = ChildReaper()
        func reaped(_ child: ChildReaper.Child) async throws {
            try await reapUntilGone(reaper, child.pid, "child \(child.pid) reaped")
        }
        for _ in 1..<50 {
            let first = try reaper.spawn(SpawnOptions(executable: "/bin/sh", arguments: ["sh", "-c", "exit 3"]))
            try await reaped(first)
            try WholeFile.write("/proc/sys/kernel/ns_last_pid", Array(String(first.pid - 1).utf8), mode: 0o644)
            let second = try reaper.spawn(SpawnOptions(executable: "/bin/sh", arguments: ["sh", "-c", "exit 5"]))
            try await reaped(second)
            guard second.pid == first.pid else {
                // Something else forked first: both exits are kept, each for its own wait.
                #expect(try await bounded { await reaper.wait(first) } == .exited(3))
                #expect(try await bounded { await reaper.wait(second) } == .exited(5))
                continue
            }
            // The later child's watcher asks first here; the earlier one's still gets its own.
            #expect(try await bounded { await reaper.wait(second) } == .exited(5))
            #expect(try await bounded { await reaper.wait(first) } == .exited(3))
            #expect(reaper.registrationsHeld == 0, "nothing kept once both were asked for")
            return
        }
        Issue.record("no pid came round again in 50 tries (something else forked each time)")
    }

    /// A child that fails before exec (no such program) is an error at `spawn`; its exit 127,
    /// which nobody will ask for, is not kept.
    @Test func aChildThatCannotStartIsAnErrorAndLeavesNothingKept() async throws {
        guard try await isolated("aChildThatCannotStartIsAnErrorAndLeavesNothingKept") else { return }
        let reaper = ChildReaper()
        #expect(throws: SpawnError.self) {
            try reaper.spawn(SpawnOptions(executable: "/nonexistent/holdfast-test", arguments: ["x"]))
        }
        try await eventually("the failed child reaped and dropped") {
            reaper.reapAll()
            return reaper.registrationsHeld == 0
        }
        let child = try reaper.spawn(SpawnOptions(executable: "/bin/sh", arguments: ["sh", "-c", "exit 4"]))
        try await reapUntilGone(reaper, child.pid, "the child reaped")
        #expect(try await bounded { await reaper.wait(child) } == .exited(4))
        #expect(reaper.registrationsHeld == 0)
    }

    /// A child forked elsewhere (a runc init, reparented to us) is waited for by pid. If its exit
    /// is kept and its pid already went to a child the reaper registered, the kept exit is still
    /// its own: a registered child's exit is never kept under a pid.
    @Test(.enabled(if: geteuid() == 0, "needs root: sets /proc/sys/kernel/ns_last_pid"))
    func aKeptExitWhosePIDWentToARegisteredChildStillReachesItsWaiter() async throws {
        guard try await isolated("aKeptExitWhosePIDWentToARegisteredChildStillReachesItsWaiter") else { return }
        let reaper = ChildReaper()
        for _ in 1..<50 {
            let elsewhere = try Spawner.spawn(SpawnOptions(executable: "/bin/sh", arguments: ["sh", "-c", "exit 6"]))
            try await reapUntilGone(reaper, elsewhere, "the unregistered child reaped")
            try WholeFile.write("/proc/sys/kernel/ns_last_pid", Array(String(elsewhere - 1).utf8), mode: 0o644)
            let registered = try reaper.spawn(SpawnOptions(executable: "/bin/sleep", arguments: ["sleep", "30"]))
            let sameSlot = registered.pid == elsewhere
            #expect(try await bounded { await reaper.wait(elsewhere) } == .exited(6), "the kept exit, even with a child of ours under the pid now")
            kill(registered.pid, SIGKILL)
            try await reapUntilGone(reaper, registered.pid, "the registered child reaped")
            #expect(try await bounded { await reaper.wait(registered) } == .signaled(SIGKILL))
            if sameSlot { return }
        }
        Issue.record("no pid came round again in 50 tries (something else forked each time)")
    }

    /// A signal for a child that was reaped a moment ago must not reach the process the kernel
    /// gave its pid to next (another container's, say): it is sent only while the child is
    /// unreaped, and says `reaped` after.
    @Test(.enabled(if: geteuid() == 0, "needs root: sets /proc/sys/kernel/ns_last_pid"))
    func aSignalForAReapedChildNeverReachesTheProcessThatGotItsPID() async throws {
        guard try await isolated("aSignalForAReapedChildNeverReachesTheProcessThatGotItsPID") else { return }
        let reaper = ChildReaper()
        let stopped = try reaper.spawn(SpawnOptions(executable: "/bin/sleep", arguments: ["sleep", "30"]))
        #expect(reaper.signal(stopped, 0) == .sent, "an unreaped child is signalled")
        #expect(reaper.signal(stopped, SIGKILL) == .sent)
        try await reapUntilGone(reaper, stopped.pid, "the child reaped")
        #expect(try await bounded { await reaper.wait(stopped) } == .signaled(SIGKILL))
        for _ in 1..<50 {
            let first = try reaper.spawn(SpawnOptions(executable: "/bin/sh", arguments: ["sh", "-c", "exit 0"]))
            try await reapUntilGone(reaper, first.pid, "the first child reaped")
            try WholeFile.write("/proc/sys/kernel/ns_last_pid", Array(String(first.pid - 1).utf8), mode: 0o644)
            let victim = try reaper.spawn(SpawnOptions(executable: "/bin/sleep", arguments: ["sleep", "30"]))
            let samePID = victim.pid == first.pid
            // The late signal for the first child.
            #expect(reaper.signal(first, SIGKILL) == .reaped)
            #expect(isRunning(victim.pid), "the victim is alive")
            // Ended with SIGTERM: a SIGKILL status would be the late signal's.
            #expect(reaper.signal(victim, SIGTERM) == .sent)
            try await reapUntilGone(reaper, victim.pid, "the victim reaped")
            #expect(try await bounded { await reaper.wait(victim) } == .signaled(SIGTERM), "ended by its own SIGTERM, not the late SIGKILL")
            #expect(try await bounded { await reaper.wait(first) } == .exited(0))
            if samePID { return }
        }
        Issue.record("no pid came round again in 50 tries (something else forked each time)")
    }

    /// A child forked elsewhere (a runc init; a process an earlier image forked) is registered
    /// as soon as its pid is known (`adopt`). Two such children given one pid in turn, both
    /// reaped before anyone asks, then each get their own exit. By pid alone the second exit
    /// replaced the first under the pid: one waiter got exit 5, the other waited for ever.
    @Test(.enabled(if: geteuid() == 0, "needs root: sets /proc/sys/kernel/ns_last_pid"))
    func anAdoptedChildKeepsItsOwnExitWhenItsPIDGoesToAnotherUnregisteredChild() async throws {
        guard try await isolated("anAdoptedChildKeepsItsOwnExitWhenItsPIDGoesToAnotherUnregisteredChild") else { return }
        let reaper = ChildReaper()
        for _ in 1..<50 {
            let initPID = try Spawner.spawn(SpawnOptions(executable: "/bin/sleep", arguments: ["sleep", "30"]))
            let adopted = try #require(reaper.adopt(initPID), "a live child of ours is adopted")
            #expect(reaper.signal(adopted, SIGKILL) == .sent)
            try await reapUntilGone(reaper, initPID, "the adopted child reaped")
            try WholeFile.write("/proc/sys/kernel/ns_last_pid", Array(String(initPID - 1).utf8), mode: 0o644)
            let next = try Spawner.spawn(SpawnOptions(executable: "/bin/sh", arguments: ["sh", "-c", "exit 5"]))
            try await reapUntilGone(reaper, next, "the next unregistered child reaped")
            // The later child's waiter asks first, by pid, as a second runc init's would.
            #expect(try await bounded { await reaper.wait(next) } == .exited(5))
            #expect(try await bounded { await reaper.wait(adopted) } == .signaled(SIGKILL), "its own exit, not exit 5")
            #expect(reaper.registrationsHeld == 0)
            if next == initPID { return }
        }
        Issue.record("no pid came round again in 50 tries (something else forked each time)")
    }

    /// Adopting a child whose exit was reaped already hands that exit to the registration; a
    /// pid that names no child of ours and no kept exit is not adopted (waited for by pid).
    @Test func adoptingAChildThatExitedAlreadyHandsItItsKeptExit() async throws {
        guard try await isolated("adoptingAChildThatExitedAlreadyHandsItItsKeptExit") else { return }
        let reaper = ChildReaper()
        let pid = try Spawner.spawn(SpawnOptions(executable: "/bin/sh", arguments: ["sh", "-c", "exit 7"]))
        try await reapUntilGone(reaper, pid, "the child reaped")
        let adopted = try #require(reaper.adopt(pid))
        #expect(try await bounded { await reaper.wait(adopted) } == .exited(7))
        #expect(reaper.signal(adopted, SIGKILL) == .reaped, "no signal for a reaped child")
        #expect(reaper.adopt(1) == nil, "init is nobody's child")
        #expect(reaper.registrationsHeld == 0)
    }

    /// A group signal (the stop's SIGKILL to what a process left behind) reaches the whole group
    /// while its leader is unreaped, and nothing once the leader is reaped: the group's number
    /// may lead another group by then, which stays alive.
    @Test(.enabled(if: geteuid() == 0, "needs root: sets /proc/sys/kernel/ns_last_pid"))
    func aGroupSignalNeverReachesTheGroupThatGotItsNumber() async throws {
        guard try await isolated("aGroupSignalNeverReachesTheGroupThatGotItsNumber") else { return }
        let reaper = ChildReaper()
        func session(_ script: String) -> SpawnOptions {
            var options = SpawnOptions(executable: "/bin/sh", arguments: ["sh", "-c", script])
            options.newSession = true
            return options
        }
        // A leader and a member it left in its group (as a container's background job).
        let files = try TemporaryDirectory()
        defer { files.remove() }
        let leader = try reaper.spawn(session("sleep 30 & echo $! > \(files.file("member")); exec sleep 30"))
        try await eventually("the member's pid written") { readFile(files.file("member")).map { $0.count > 1 } ?? false }
        let member = pid_t(String(decoding: readFile(files.file("member"))!.dropLast(), as: UTF8.self))!
        #expect(reaper.signalGroup(leader, SIGKILL) == .sent)
        try await reapUntilGone(reaper, leader.pid, "the leader reaped")
        // Reparented to whichever subreaper or init is above this process: gone, or a zombie.
        try await eventually("the member killed with its group") { !isRunning(member) }
        #expect(try await bounded { await reaper.wait(leader) } == .signaled(SIGKILL))
        for _ in 1..<50 {
            let first = try reaper.spawn(session("exit 0"))
            try await reapUntilGone(reaper, first.pid, "the first leader reaped")
            try WholeFile.write("/proc/sys/kernel/ns_last_pid", Array(String(first.pid - 1).utf8), mode: 0o644)
            let victim = try reaper.spawn(session("exec sleep 30"))
            let sameNumber = victim.pid == first.pid
            #expect(reaper.signalGroup(first, SIGKILL) == .reaped, "the late group signal is not sent")
            #expect(isRunning(victim.pid), "the group that got the number is alive")
            #expect(reaper.signal(victim, SIGTERM) == .sent)
            try await reapUntilGone(reaper, victim.pid, "the victim reaped")
            #expect(try await bounded { await reaper.wait(victim) } == .signaled(SIGTERM), "ended by its own SIGTERM, not the late SIGKILL")
            #expect(try await bounded { await reaper.wait(first) } == .exited(0))
            if sameNumber { return }
        }
        Issue.record("no pid came round again in 50 tries (something else forked each time)")
    }
}

@Suite("The reaper's kept exits")
struct KeptExitsTests {
    /// An exit its waiter took leaves its entry in the eviction list; when that entry's turn
    /// comes, it must not take a later child's exit under the same pid (a `runc exec` process
    /// that exited before it was adopted would have none, and its waiter would wait for ever).
    @Test func aStaleEvictionEntryDoesNotTakeALaterExitOfTheSamePid() {
        var kept = KeptExits(limit: 3)
        kept.keep(100, .exited(1))
        #expect(kept.take(100) == .exited(1), "its waiter took it")
        kept.keep(100, .exited(2))  // the pid, given to a later child
        kept.keep(101, .exited(0))
        kept.keep(102, .exited(0))  // the stale entry's turn
        #expect(kept[100] == .exited(2), "the later exit is kept")
        kept.keep(103, .exited(0))  // now the later exit is the oldest
        #expect(kept[100] == nil && kept.count == 3)
        #expect(kept.all == [101: .exited(0), 102: .exited(0), 103: .exited(0)])
    }
}
