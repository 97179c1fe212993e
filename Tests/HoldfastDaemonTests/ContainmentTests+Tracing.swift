import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A container process that calls `ptrace(PTRACE_TRACEME)` — the anti-debugging check many
/// programs make ("is a debugger attached?") — makes its parent its tracer, and its parent is
/// the supervisor. From then on every signal it gets, and its next exec, stop it and are
/// reported to the supervisor's waitpid as stops, which no option can turn off for a tracer.
/// Before, the reaper took such a stop for an exit (`killed by signal 0`): the host was told
/// the process had ended while it sat stopped for ever, its output cut off. Now the supervisor
/// lets go of the process at its first stop and hands the signal on (README, "Security").
extension ContainmentTests {
    /// python3 running `body` after a `traceme()` helper; every line is flushed at once.
    static func tracedPython(_ body: String) -> [String] {
        let prelude = """
            import ctypes, os, signal, sys, time
            libc = ctypes.CDLL(None, use_errno=True)
            def traceme():
                return libc.ptrace(0, 0, None, None)  # PTRACE_TRACEME
            def say(*words):
                print(*words, flush=True)

            """
        return ["python3", "-c", prelude + body]
    }

    /// A stream's whole text, bounded: a process left stopped would hold it open for ever.
    static func text(_ output: Task<[UInt8], Never>) async throws -> String {
        String(decoding: try await withDeadline("the stream's end", .seconds(60)) { await output.value }, as: UTF8.self)
    }

    @Test(.enabled(if: DaemonFixture.canRun && Self.hasPython, "needs root (the daemon's broker runs as a uid of its own) and python3"))
    func aProcessThatAsksToBeTracedRunsOnAndItsExitIsItsOwn() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let bystander = try await Self.startBystander(daemon)
        let before = try await Self.roles(daemon)

        // 1. Traced, then it executes another program: the exec's SIGTRAP (a tracer's, sent only
        //    because it is traced) stopped it for ever, and its exit was reported at once.
        let execsOutput = collect(try daemon.streams.open(token: bytes("execs-out"), direction: .receive))
        _ = try await daemon.launch(ProcessSpec(
            id: "execs", argv: Self.tracedPython("""
                say("traced", traceme())
                os.execvp("sh", ["sh", "-c", "echo after exec; exit 7"])
                """),
            stdout: daemon.spec("execs-out")))
        let execs = try await daemon.wait("execs")
        #expect(execs.exitCode == 7 && execs.signal == nil, "its own exit, after the exec: \(execs)")
        #expect(try await Self.text(execsOutput) == "traced 0\nafter exec\n")

        // 2. Traced three times over, each time a signal: a handled one reaches its handler, a
        //    SIGSTOP stops it (and the host's SIGCONT, through the daemon, which must still hold
        //    it running, continues it), a SIGTERM ends it as SIGTERM.
        let signalsOutput = collect(try daemon.streams.open(token: bytes("signals-out"), direction: .receive))
        let pid = try await daemon.launch(ProcessSpec(
            id: "signals", argv: Self.tracedPython("""
                handled = []
                signal.signal(signal.SIGUSR1, lambda *_: handled.append(1))
                say("traced", traceme())
                os.kill(os.getpid(), signal.SIGUSR1)
                deadline = time.monotonic() + 60
                while not handled and time.monotonic() < deadline:
                    time.sleep(0.001)
                say("handled", len(handled))
                say("traced again", traceme())
                os.kill(os.getpid(), signal.SIGSTOP)
                say("continued")
                say("traced a third time", traceme())
                os.kill(os.getpid(), signal.SIGTERM)
                say("not reached")
                """),
            stdout: daemon.spec("signals-out")))
        try await eventually("the process to stop on its SIGSTOP, untraced") { ProcessRunState.of(pid) == .stopped }
        let listed = try await daemon.status().processes.first { $0.id == "signals" }
        #expect(listed?.state == .running, "a stopped process is still running to the daemon: \(String(describing: listed))")
        let client = try await daemon.control()
        defer { client.close() }
        let continuing = SupervisorRequest.signal(SignalRequest(id: "signals", signal: SIGCONT))
        _ = try await client.request(continuing.frameType, body: continuing.body)
        let signals = try await daemon.wait("signals")
        #expect(signals.signal == SIGTERM && signals.exitCode == 128 + SIGTERM, "ended by its own SIGTERM: \(signals)")
        #expect(try await Self.text(signalsOutput) == "traced 0\nhandled 1\ntraced again 0\ncontinued\ntraced a third time 0\n")

        // 3. An orphan the supervisor took in (as the subreaper: its parent exited) traces itself
        //    and executes `sh`. Its tracer is the thread the kernel reparented it to, the main
        //    thread, which is the one that forks and lets go (`SpawnThread`); under the async
        //    main it sat in libdispatch's sigsuspend, and the orphan stayed stopped, holding the
        //    process's output open.
        let orphanOutput = collect(try daemon.streams.open(token: bytes("orphan-out"), direction: .receive))
        _ = try await daemon.launch(ProcessSpec(
            id: "orphan", argv: Self.tracedPython("""
                parent = os.getpid()
                r, w = os.pipe()
                if os.fork() == 0:
                    os.close(w)
                    os.read(r, 1)
                    deadline = time.monotonic() + 60
                    while os.getppid() == parent and time.monotonic() < deadline:
                        time.sleep(0.001)
                    say("orphan traced", traceme())
                    os.execvp("sh", ["sh", "-c", "echo orphan ran on"])
                os.close(r)
                say("parent exits")
                """),
            stdout: daemon.spec("orphan-out")))
        // Bounded: an orphan left stopped holds the output, and the exit waits for it for ever.
        let orphan = try await withDeadline("the exit of the process whose orphan traced itself", .seconds(60)) {
            try await daemon.wait("orphan")
        }
        #expect(orphan.exitCode == 0 && orphan.outputCutShort == nil && orphan.undelivered == 0, "\(orphan)")
        #expect(try await Self.text(orphanOutput) == "parent exits\norphan traced 0\norphan ran on\n")

        try await Self.expectIntact(daemon, roles: before, bystander: bystander)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// The tracer of a process that traced itself is a thread: the supervisor's main thread. A
    /// live upgrade's exec is made on it, so it goes on as the new image's main thread and the
    /// process stays its tracee: had the exec come from another thread, the kernel would have
    /// ended the main thread and let its tracees go with their pending signal — for one stopped
    /// just then (the reaper is frozen while the state is written down), the exec's SIGTRAP,
    /// which kills it. Checked here by the relationship itself (`TracerPid` across the upgrade),
    /// then by the process's exec after it, which the new image lets go.
    @Test(.enabled(if: DaemonFixture.canRun && Self.hasPython, "needs root (the daemon's broker runs as a uid of its own) and python3"))
    func aProcessTracedBeforeALiveUpgradeIsLetGoByTheNewImage() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let go = daemon.directory.file("go")
        let output = Accumulator(try daemon.streams.open(token: bytes("traced-out"), direction: .receive))
        let pid = try await daemon.launch(ProcessSpec(
            id: "traced", argv: Self.tracedPython("""
                say("traced", traceme())
                deadline = time.monotonic() + 120
                while not os.path.exists("\(go)") and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.execvp("sh", ["sh", "-c", "echo after the upgrade; exit 5"])
                """),
            stdout: daemon.spec("traced-out")))
        try await eventually("the process traced") { output.text == "traced 0\n" }
        #expect(ProcessRunState.of(pid) == .traced(by: daemon.daemonPID), "its tracer is the supervisor's main thread")

        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        try await eventually("the upgraded daemon serving") { (try? await daemon.status().upgrades) == 1 }
        #expect(ProcessRunState.of(pid) == .traced(by: daemon.daemonPID), "still its tracer after the upgrade: the exec was made on that thread")

        try writeFile(go, [])
        let report = try await withDeadline("its exit", .seconds(60)) { try await daemon.wait("traced") }
        #expect(report.exitCode == 5 && report.signal == nil, "its own exit after its exec: \(report)")
        #expect(output.text == "traced 0\nafter the upgrade\n")
        #expect(try await daemon.stop() == .exited(0))
    }
}
