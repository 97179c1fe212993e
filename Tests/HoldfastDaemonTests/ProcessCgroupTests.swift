import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Each direct process runs in a cgroup of its own: what it starts stays inside, even after
/// `setsid`, so a daemon stop ends it, a restart after a crash ends what the crashed daemon's
/// processes left, and a live upgrade keeps it.
@Suite("Process cgroups: what a process starts ends with it", .timeLimit(.minutes(5)))
struct ProcessCgroupTests {
    /// Where cgroup v2 is mounted and writable with `cgroup.kill` (Linux 5.14), as root.
    static var available: Bool {
        guard DaemonFixture.canRun, let mountinfo = readFile("/proc/self/mountinfo") else { return false }
        return CgroupLocation.unifiedMounts(mountinfo: String(decoding: mountinfo, as: UTF8.self)).contains { mount in
            let probe = mount.mountPoint + "/holdfast-probe-\(UInt32.random(in: 0..<UInt32.max))"
            guard mkdir(probe, 0o755) == 0 else { return false }
            defer { rmdir(probe) }
            return access(probe + "/cgroup.kill", W_OK) == 0
        }
    }

    /// A process that is not in our process's group or session any more: `setsid` (no fork: the
    /// background child of a non-interactive shell leads no group), its pid written to
    /// `pidFile`, holding the process's stdout if it has one.
    static func escapingCommand(pidFile: String, then rest: String = "exec sleep 1000") -> [String] {
        ["sh", "-c", "setsid sh -c 'echo $$ > \(pidFile); exec sleep 1000' & echo started; \(rest)"]
    }

    /// A process the test saw (`ProcessIdentity`: a pid given again is never taken for it),
    /// with its cgroup.
    struct Tracked: CustomStringConvertible {
        let identity: ProcessIdentity

        init(_ pid: pid_t) throws {
            identity = try #require(ProcessIdentity(pid), "process \(pid) runs")
        }

        var pid: pid_t { identity.pid }
        var isAlive: Bool { identity.isAlive }

        /// Its cgroup v2 path (`0::` line of /proc/PID/cgroup).
        var cgroup: String? {
            readFile("/proc/\(pid)/cgroup").flatMap { CgroupLocation.unifiedPath(procCgroup: String(decoding: $0, as: UTF8.self)) }
        }

        /// Ends it, by pid, if it is still the process the test saw.
        func end() {
            if isAlive { kill(pid, SIGKILL) }
        }

        var description: String { identity.description }
    }

    static func pid(in file: String) async throws -> pid_t {
        var found: pid_t?
        try await eventually("the pid in \(file)") {
            found = readFile(file).flatMap { pid_t(String(decoding: $0, as: UTF8.self).filter { $0.isNumber }) }
            return found != nil
        }
        return found!
    }

    /// The directory of a cgroup v2 path, under the mount that shows it.
    static func directory(of path: String) throws -> String {
        let mountinfo = String(decoding: try #require(readFile("/proc/self/mountinfo")), as: UTF8.self)
        let mount = try #require(CgroupLocation.unifiedMounts(mountinfo: mountinfo).first { $0.root == "/" })
        return mount.mountPoint + path
    }

    /// The daemon's directory of process cgroups (`<its cgroup>/holdfast-<tag>`).
    static func processCgroupsDirectory(of daemon: DaemonFixture) throws -> String {
        let own = try #require(try Tracked(daemon.daemonPID).cgroup)
        return try directory(of: own) + "/holdfast-" + ProcessCgroups.tag(runDirectory: daemon.directory.path)
    }

    static func parent(_ path: String) -> String {
        String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)])
    }

    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func aDaemonStopEndsWhatAProcessStartedOutsideItsProcessGroup() async throws {
        // The drain timeout (30 s) is longer than the whole stop (6 s): the output drains only
        // if the escaped child holding it ends.
        let daemon = try await DaemonFixture(drainTimeout: "30s", shutdown: ("1s", "6s"))
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let pidFile = daemon.directory.file("escaped.pid")
        let output = collect(try daemon.streams.open(token: bytes("e-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(id: "e", argv: Self.escapingCommand(pidFile: pidFile), stdout: daemon.spec("e-out")))
        let escaped = try Tracked(try await Self.pid(in: pidFile))
        defer { escaped.end() }
        let cgroup = try #require(escaped.cgroup)
        #expect(cgroup.split(separator: "/").last?.hasPrefix("process-") == true, "in a process cgroup: \(cgroup)")
        #expect(getsid(escaped.pid) == escaped.pid, "in a session of its own, out of reach of a group signal")
        let daemonDirectory = try Self.directory(of: Self.parent(cgroup))
        #expect(access(daemonDirectory, F_OK) == 0)
        // And one that is done already, its exit taken, with a child it left running.
        let leftFile = daemon.directory.file("left.pid")
        _ = try await daemon.launch(ProcessSpec(id: "done", argv: Self.escapingCommand(pidFile: leftFile, then: "exit 0")))
        #expect(try await daemon.wait("done").exitCode == 0)
        let left = try Tracked(try await Self.pid(in: leftFile))
        defer { left.end() }

        #expect(try await daemon.stop() == .exited(0))
        try await eventually("the exit at the host") { exits.count("e") == 1 }
        let exit = try #require(exits.all.first { $0.id == "e" })
        #expect(exit.outputCutShort != true && exit.undelivered == 0, "the output drained: what held it ended \(exit)")
        #expect(await output.value == bytes("started\n"))
        #expect(!escaped.isAlive, "what left the process group ended with the stop")
        #expect(!left.isAlive, "what a done process left running ended with the stop")
        #expect(access(daemonDirectory, F_OK) != 0, "the daemon's cgroup directory is gone")
    }

    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func aProcessCgroupGoesOnceTheProcessIsDoneAndWhatItLeftEnds() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let output = collect(try daemon.streams.open(token: bytes("c-out"), direction: .receive))
        _ = try await daemon.launch(ProcessSpec(id: "c", argv: ["cat", "/proc/self/cgroup"], stdout: daemon.spec("c-out")))
        #expect(try await daemon.wait("c").exitCode == 0)
        let own = try #require(CgroupLocation.unifiedPath(procCgroup: String(decoding: await output.value, as: UTF8.self)))
        #expect(own.split(separator: "/").last?.hasPrefix("process-") == true, "\(own)")
        try await eventually("its cgroup removed once it is done") { access(try Self.directory(of: own), F_OK) != 0 }

        // One that leaves a child running (no stream for it to hold): the cgroup stays while
        // the child lives, and goes once it ended and another process is done.
        let pidFile = daemon.directory.file("left.pid")
        _ = try await daemon.launch(ProcessSpec(id: "l", argv: Self.escapingCommand(pidFile: pidFile, then: "exit 0")))
        #expect(try await daemon.wait("l").exitCode == 0)
        let left = try Tracked(try await Self.pid(in: pidFile))
        defer { left.end() }
        let leftCgroup = try Self.directory(of: try #require(left.cgroup))
        #expect(access(leftCgroup, F_OK) == 0, "kept while something runs in it")
        left.end()
        try await eventually("the child ended") { !left.isAlive }
        _ = try await daemon.launch(ProcessSpec(id: "next", argv: ["true"]))
        #expect(try await daemon.wait("next").exitCode == 0)
        try await eventually("the emptied cgroup removed") { access(leftCgroup, F_OK) != 0 }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// `host stop`'s sequence: SIGTERM ends the process, but a child in a session of its own
    /// holds the output, so the exit is not reported (the drain timeout is 30 s); the SIGKILL
    /// that follows ends the child through the cgroup, the output drains, the exit comes.
    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func aSIGKILLEndsEverythingInTheCgroupEvenAfterTheProcessExited() async throws {
        let daemon = try await DaemonFixture(drainTimeout: "30s")
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let pidFile = daemon.directory.file("held.pid")
        let output = collect(try daemon.streams.open(token: bytes("h-out"), direction: .receive))
        let leaderPID = try await daemon.bridge.create(ProcessSpec(id: "h", argv: Self.escapingCommand(pidFile: pidFile), stdout: daemon.spec("h-out")))
        let leader = try Tracked(leaderPID)
        defer { leader.end() }
        let escaped = try Tracked(try await Self.pid(in: pidFile))
        defer { escaped.end() }

        try await daemon.bridge.signal("h", SIGTERM)
        try await eventually("the process itself ended") { !leader.isAlive }
        try await eventually("the daemon saw it exit") { (try? await daemon.status())?.processes.first { $0.id == "h" }?.state == .exited }
        #expect(escaped.isAlive && exits.count("h") == 0, "its child holds the output: no exit yet")

        try await daemon.bridge.signal("h", SIGKILL)
        try await eventually("the exit at the host", timeout: .seconds(10)) { exits.count("h") == 1 }
        let exit = try #require(exits.all.first { $0.id == "h" })
        #expect(exit.signal == SIGTERM && exit.outputCutShort != true && exit.undelivered == 0, "\(exit)")
        // Its output ended as the kernel closed its files, which comes before the rest of its
        // exit: on a busy machine the report can arrive while it is still finishing (seen once).
        try await eventually("the child ended with the cgroup", timeout: .seconds(5)) { !escaped.isAlive }
        #expect(await output.value == bytes("started\n"))
        #expect(try await daemon.stop() == .exited(0))
    }

    /// `status` counts what is in each process's cgroup: its processes, and the CPU time of
    /// all of them, what ended included.
    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func statusCountsTheProcessesAndTheCPUTimeOfEachCgroup() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let marker = daemon.directory.file("busy-done")
        // A child that burns CPU and ends, two that sleep, and the process itself.
        let burn = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"
        let pid = try await daemon.launch(ProcessSpec(
            id: "busy", argv: ["sh", "-c", "sh -c '\(burn)'; sleep 1000 & sleep 1000 & touch \(marker); exec sleep 1000"]))
        let leader = try Tracked(pid)
        defer { leader.end() }
        try await eventually("the burner done") { access(marker, F_OK) == 0 }
        let cgroup = try Self.directory(of: try #require(leader.cgroup))
        let usage = String(decoding: readFile(cgroup + "/cpu.stat") ?? [], as: UTF8.self)
        // The shell execs its last sleep after the touch: 3 once it did.
        var status: ProcessStatus?
        do {
            try await eventually("the process and its two sleeping children") {
                status = try await daemon.status().processes.first { $0.id == "busy" }
                return status?.tasks == 3
            }
        } catch {
            Issue.record("\(String(describing: status))")
            throw error
        }
        let cpuSeconds = try #require(status?.cpuSeconds)
        let cpu = cpuSeconds
        #expect(cpu > 0.05, "the ended burner's CPU time is counted: \(cpu) s; \(usage)")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A cgroup that cannot be made is no reason to refuse a process: it runs without one.
    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func aProcessRunsWithoutACgroupWhenNoneCanBeMade() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let own = try #require(try Tracked(daemon.daemonPID).cgroup)
        let daemonDirectory = try Self.processCgroupsDirectory(of: daemon)
        try writeFile(daemonDirectory + "/cgroup.max.descendants", bytes("0"))
        let output = collect(try daemon.streams.open(token: bytes("n-out"), direction: .receive))
        _ = try await daemon.launch(ProcessSpec(id: "n", argv: ["cat", "/proc/self/cgroup"], stdout: daemon.spec("n-out")))
        #expect(try await daemon.wait("n").exitCode == 0)
        let path = CgroupLocation.unifiedPath(procCgroup: String(decoding: await output.value, as: UTF8.self))
        #expect(path == own, "in the daemon's own cgroup")
        try await daemon.waitForLog("process runs without a cgroup")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Every child is forked on one thread (the daemon's main thread, `SpawnThread`: the tracer
    /// of a child that traces itself), but the wait for its exec is not made there. A process
    /// whose set-up cannot finish — here its cgroup is frozen before it execs, as a working
    /// directory or binary on a hung file system would hold it — holds its own create only: a
    /// broker killed meanwhile is forked again and serves, and the process starts when let.
    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func aProcessThatCannotStartYetHoldsNoOtherFork() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let processes = try Self.processCgroupsDirectory(of: daemon)
        try writeFile(processes + "/cgroup.freeze", bytes("1"))
        let frozen = NIOLockedValueBox(true)
        defer { if frozen.withLockedValue({ $0 }) { try? writeFile(processes + "/cgroup.freeze", bytes("0")) } }
        let output = collect(try daemon.streams.open(token: bytes("held-out"), direction: .receive))
        let started = NIOLockedValueBox(false)
        let held = Task {
            defer { started.withLockedValue { $0 = true } }
            return try await daemon.launch(ProcessSpec(id: "held", argv: ["echo", "started"], stdout: daemon.spec("held-out")))
        }
        try await eventually("the process frozen in its cgroup before its exec") {
            ProcessCgroups.processCgroupNames(in: processes).contains { !(readFile(processes + "/" + $0 + "/cgroup.procs") ?? []).isEmpty }
        }

        let broker = try #require(try await daemon.rolePID("broker").flatMap(ProcessIdentity.init))
        #expect(kill(broker.pid, SIGKILL) == 0)
        // Bounded as a whole: the daemon's answers themselves may wait for a broker it cannot
        // start (the hang this test guards against).
        try await withDeadline("a new broker forked while the create waits", .seconds(60)) {
            try await eventually("a new broker forked while the create waits") { try await daemon.roleIsAnother("broker", than: broker) }
        }
        #expect(!started.withLockedValue { $0 }, "the create still waits for its process")

        try writeFile(processes + "/cgroup.freeze", bytes("0"))
        frozen.withLockedValue { $0 = false }
        _ = try await withDeadline("the create once its process may start", .seconds(60)) { try await held.value }
        #expect(try await daemon.wait("held").exitCode == 0)
        #expect(String(decoding: try await withDeadline("its output", .seconds(60)) { await output.value }, as: UTF8.self) == "started\n")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// More creates whose processes cannot exec yet than the machine has CPUs (the Swift
    /// runtime's cooperative pool has one thread per CPU, and does not grow): the daemon still
    /// answers — `status`, a signal, the exit it causes — while they wait, and each starts when
    /// let. Before, each create waited for its exec on a pool thread: with every thread so held,
    /// nothing else ran (under systemd the watchdog then killed the daemon, and every container).
    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func processesThatCannotStartYetHoldNothingElse() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        _ = try await daemon.bridge.create(ProcessSpec(id: "victim", argv: ["sleep", "1000"]))
        let processes = try Self.processCgroupsDirectory(of: daemon)
        try writeFile(processes + "/cgroup.freeze", bytes("1"))
        let frozen = NIOLockedValueBox(true)
        defer { if frozen.withLockedValue({ $0 }) { try? writeFile(processes + "/cgroup.freeze", bytes("0")) } }
        let count = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) + 2
        let held = (0..<count).map { index in
            Task { try await daemon.launch(ProcessSpec(id: "held\(index)", argv: ["true"])) }
        }
        try await eventually("\(count) processes frozen before their exec") {
            ProcessCgroups.processCgroupNames(in: processes).filter { !(readFile(processes + "/" + $0 + "/cgroup.procs") ?? []).isEmpty }.count >= count + 1
        }
        try await withDeadline("status while they wait", .seconds(15)) { _ = try await daemon.status() }
        // The victim is frozen too (its cgroup is under the same directory): SIGKILL reaches it.
        try await withDeadline("a signal while they wait", .seconds(15)) { try await daemon.bridge.signal("victim", SIGKILL) }
        try writeFile(processes + "/cgroup.freeze", bytes("0"))
        frozen.withLockedValue { $0 = false }
        try await eventually("the victim's exit") { exits.count("victim") == 1 }
        for task in held { _ = try await withDeadline("a held create once its process may start", .seconds(60)) { try await task.value } }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A process that cannot exec yet holds no copy of another process's pipes. The fork gives
    /// the child every fd the supervisor has — a running process's stdin write end among them —
    /// and close-on-exec ends them only at the exec: while a binary or working directory on a hung
    /// file system held it off, a victim's close-stdin never reached it as end-of-file.
    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func aProcessThatCannotStartYetHoldsNoOtherProcessesPipes() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let input = try daemon.streams.open(token: bytes("v-in"), direction: .send)
        let output = accumulate(try daemon.streams.open(token: bytes("v-out"), direction: .receive))
        let victim = try await daemon.launch(ProcessSpec(id: "victim", argv: ["cat"], stdin: daemon.spec("v-in"), stdout: daemon.spec("v-out")))
        try await input.send(bytes("typed\n"))
        // Through before the close-stdin below, which ends the stdin whatever is still on its way.
        try await eventually("what was typed, echoed", timeout: .seconds(30)) { output.count >= 6 }
        // Out of the directory about to be frozen, so that it can read its end-of-file.
        let own = try #require(try Tracked(daemon.daemonPID).cgroup)
        try writeFile(try Self.directory(of: own) + "/cgroup.procs", bytes("\(victim)"))
        let processes = try Self.processCgroupsDirectory(of: daemon)
        try writeFile(processes + "/cgroup.freeze", bytes("1"))
        let frozen = NIOLockedValueBox(true)
        defer { if frozen.withLockedValue({ $0 }) { try? writeFile(processes + "/cgroup.freeze", bytes("0")) } }
        let held = Task { try await daemon.launch(ProcessSpec(id: "held", argv: ["true"])) }
        try await eventually("the process frozen in its cgroup before its exec") {
            ProcessCgroups.processCgroupNames(in: processes).contains { !(readFile(processes + "/" + $0 + "/cgroup.procs") ?? []).isEmpty }
        }

        try await daemon.bridge.closeStdin("victim")
        let status = try await withDeadline("the victim's end-of-file while the other create waits", .seconds(20)) { try await daemon.wait("victim") }
        #expect(status.exitCode == 0)
        #expect(output.bytes == bytes("typed\n"))

        try writeFile(processes + "/cgroup.freeze", bytes("0"))
        frozen.withLockedValue { $0 = false }
        _ = try await withDeadline("the held create once its process may start", .seconds(60)) { try await held.value }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A process that does not reach its exec within `processes.start_timeout` (here frozen
    /// before it, as a binary or working directory on a file system that does not answer holds
    /// it) is killed and its create fails, saying why; nothing of it is left. Before, the create
    /// waited for as long as the file system hung — a host request in flight for good (32 such
    /// and the host's connection stopped being read) and every live upgrade refused.
    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func aProcessThatDoesNotReachItsExecInTimeIsKilledAndItsCreateFails() async throws {
        let daemon = try await DaemonFixture(extraConfig: "processes:\n  start_timeout: 2s")
        defer { daemon.cleanUp() }
        let processes = try Self.processCgroupsDirectory(of: daemon)
        try writeFile(processes + "/cgroup.freeze", bytes("1"))
        let frozen = NIOLockedValueBox(true)
        defer { if frozen.withLockedValue({ $0 }) { try? writeFile(processes + "/cgroup.freeze", bytes("0")) } }
        do {
            _ = try await withDeadline("the create's answer", .seconds(30)) {
                try await daemon.launch(ProcessSpec(id: "held", argv: ["true"]))
            }
            Issue.record("a process frozen before its exec was reported started")
        } catch let error as HoldfastError {
            #expect(error.code == .startFailed && error.message.contains("had not reached its exec 2s after its fork"), "\(error)")
        }
        try await eventually("its cgroup gone with it") { ProcessCgroups.processCgroupNames(in: processes).isEmpty }
        #expect(try await daemon.status().processes.isEmpty)
        try writeFile(processes + "/cgroup.freeze", bytes("0"))
        frozen.withLockedValue { $0 = false }
        _ = try await daemon.launch(ProcessSpec(id: "next", argv: ["true"]))
        #expect(try await daemon.wait("next").exitCode == 0)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A process's working directory is entered as its own user. Entered as root, a directory it
    /// may not enter was accepted, and a symlink it planted led it past a directory closed to
    /// it (/root/app under a 0700 /root), where it could read what that directory protected.
    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func theWorkingDirectoryIsEnteredAsTheProcesssUser() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let closed = daemon.directory.file("closed")
        #expect(mkdir(closed, 0o700) == 0)
        let open = closed + "/open"
        #expect(mkdir(open, 0o755) == 0)
        try writeFile(open + "/secret", bytes("secret\n"))
        let planted = daemon.directory.file("planted")
        #expect(symlink(open, planted) == 0)
        let output = collect(try daemon.streams.open(token: bytes("r-out"), direction: .receive))
        let asRoot = try await daemon.launch(ProcessSpec(id: "root", argv: ["cat", "secret"], cwd: planted, stdout: daemon.spec("r-out")))
        #expect(asRoot > 0)
        #expect(await output.value == bytes("secret\n"), "root enters it")
        for (id, cwd) in [("through-the-link", planted), ("into-it", open)] {
            do {
                _ = try await daemon.launch(ProcessSpec(id: id, argv: ["cat", "secret"], cwd: cwd, user: "65534"))
                Issue.record("\(id): a process of uid 65534 started in \(cwd), under a directory only root may enter")
            } catch let error as HoldfastError {
                #expect(error.message.contains("chdir"), "\(id): \(error)")
            }
        }
        #expect(try await daemon.stop() == .exited(0))
    }

    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func aRestartedDaemonEndsWhatACrashedOneLeftRunning() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let pidFile = daemon.directory.file("orphan.pid")
        let leaderPID = try await daemon.launch(ProcessSpec(id: "o", argv: Self.escapingCommand(pidFile: pidFile)))
        let leader = try Tracked(leaderPID)
        defer { leader.end() }
        let escaped = try Tracked(try await Self.pid(in: pidFile))
        defer { escaped.end() }

        // A crash: the roles die with the supervisor (parent-death signal), the processes do not.
        kill(daemon.daemonPID, SIGKILL)
        _ = try await daemon.processes.wait(daemon.daemonPID, timeout: .seconds(20))
        #expect(leader.isAlive && escaped.isAlive, "a crash leaves the container processes running")

        try await daemon.startAgain()
        #expect(!leader.isAlive, "the new daemon ended the crashed one's process")
        #expect(!escaped.isAlive, "and what it started in a session of its own")
        try await daemon.waitForLog("ended what an earlier daemon's processes left running")
        #expect(try await daemon.status().processes.isEmpty)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A process done before a live upgrade (its exit not taken yet), whose orphan still fills
    /// its cgroup: the earlier image released that cgroup to go once empty; the new image
    /// tracked it again as a running process's, and it stayed until the daemon's stop.
    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func aCgroupReleasedBeforeALiveUpgradeGoesOnceEmptyAfterIt() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let pidFile = daemon.directory.file("orphan.pid")
        _ = try await daemon.launch(ProcessSpec(id: "o", argv: Self.escapingCommand(pidFile: pidFile, then: "exit 0")))
        let orphan = try Tracked(try await Self.pid(in: pidFile))
        defer { orphan.end() }
        let cgroup = try Self.directory(of: try #require(orphan.cgroup))
        try await eventually("the process done, its exit not taken", timeout: .seconds(30)) { try await daemon.status().processes.first { $0.id == "o" }?.state == .done }

        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        try await eventually("the upgraded daemon serving") { (try? await daemon.status().upgrades) == 1 }
        #expect(access(cgroup, F_OK) == 0, "still filled by the orphan")
        orphan.end()
        try await eventually("the orphan gone") { !orphan.isAlive }
        // Another process's end tidies the cgroups that emptied.
        _ = try await daemon.launch(ProcessSpec(id: "t", argv: ["true"]))
        #expect(try await daemon.wait("t").exitCode == 0)
        try await eventually("the emptied cgroup removed") { access(cgroup, F_OK) != 0 }
        #expect(try await daemon.stop() == .exited(0))
    }

    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func aLiveUpgradeKeepsEachProcessInItsCgroup() async throws {
        let daemon = try await DaemonFixture(drainTimeout: "30s", shutdown: ("1s", "6s"))
        defer { daemon.cleanUp() }
        let pidFile = daemon.directory.file("kept.pid")
        _ = try await daemon.launch(ProcessSpec(id: "k", argv: Self.escapingCommand(pidFile: pidFile)))
        let escaped = try Tracked(try await Self.pid(in: pidFile))
        defer { escaped.end() }
        let before = escaped.cgroup

        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        try await eventually("the upgraded daemon serving") { (try? await daemon.status().upgrades) == 1 }
        #expect(escaped.isAlive && escaped.cgroup == before, "the process's cgroup is untouched by the upgrade")

        #expect(try await daemon.stop() == .exited(0))
        #expect(!escaped.isAlive, "the stop after the upgrade ends what the process started, through its cgroup")
    }
}
