import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Signals an operator sends the supervisor by habit. Each one's default action would end it,
/// and every container with it: SIGHUP (`kill -HUP` to reload, a terminal hangup), SIGUSR1 and
/// SIGUSR2 (a dump, in other daemons), SIGQUIT (Ctrl-\).
@Suite("Signals to holdfast: HUP reloads, stray ones are ignored, QUIT stops in order", .timeLimit(.minutes(3)))
struct DaemonSignalTests {
    /// SIGHUP reloads: a live upgrade onto the binary now at the daemon's path (the same pid,
    /// the new sha256, a stream across it exact). SIGUSR1 and SIGUSR2 change nothing but a log
    /// line, and neither is held across the upgrade's exec. SIGQUIT stops the daemon in order:
    /// the process's exit reaches the host, and the daemon exits 0. Before, SIGHUP ended the
    /// supervisor (and every container) at once.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func hangupReloadsUserSignalsAreIgnoredAndQuitStopsInOrder() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let daemon = try await DaemonFixture(executable: binary.path)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let output = try await Self.startCounter(daemon, id: "counter", token: "counter-out")
        let before = try await daemon.status()

        let sha = try binary.install(variant: 1)
        #expect(kill(daemon.daemonPID, SIGHUP) == 0)
        try await eventually("the reload done", timeout: .seconds(60)) { (try? await daemon.status())?.upgrades == 1 }
        let reloaded = try await daemon.status()
        #expect(reloaded.pid == before.pid && reloaded.executableSHA256 == sha, "the same supervisor, the new binary")
        #expect(reloaded.processes.first { $0.id == "counter" }?.pid == before.processes.first { $0.id == "counter" }?.pid, "the same process")
        try await daemon.waitForLog("SIGHUP: reloading")

        try await eventually("both roles serving", timeout: .seconds(30)) { try await daemon.status().roles.allSatisfy { $0.pid != nil } }
        let roles = try await daemon.status().roles
        for signal in [SIGUSR1, SIGUSR2] {
            #expect(kill(daemon.daemonPID, signal) == 0)
        }
        try await eventually("both said and ignored") {
            daemon.log.contains("SIGUSR1 ignored") && daemon.log.contains("SIGUSR2 ignored")
        }
        let after = try await daemon.status()
        #expect(after.pid == before.pid && after.upgrades == 1 && after.roles.map(\.pid) == roles.map(\.pid), "nothing else changed")

        let atQuit = output.count
        try await eventually("output after the reload") { output.count > atQuit + 100 }
        #expect(kill(daemon.daemonPID, SIGQUIT) == 0)
        #expect(try await daemon.processes.wait(daemon.daemonPID, timeout: .seconds(30)) == .exited(0))
        // The host's log of exits is filled by a task of its own, which a loaded run schedules
        // after the acknowledgement (and the daemon's end): waited for. Nothing can arrive
        // after the daemon's end, so what is there arrived before it.
        try await eventually("the exit at the host", timeout: .seconds(10)) { exits.all.contains { $0.id == "counter" } }
        let report = try #require(exits.all.first { $0.id == "counter" }, "the exit reached the host before the daemon ended")
        #expect(report.signal == SIGTERM && report.outputCutShort == nil && report.lost == nil, "\(report)")
        // Every line once, in order, up to the last one printed.
        let numbers = EveryKindOfStream.numbers(Array(output.text.utf8), prefix: "by")
        #expect(!numbers.isEmpty && numbers == Array(1...numbers.last!), "every line once, in order, across the reload: \(numbers.count) lines")
        print("SIGHUP reloaded (\(before.executableSHA256?.prefix(12) ?? "?") -> \(sha.prefix(12))); SIGQUIT stopped it in order after \(numbers.count) lines")
    }

    /// Signals that ask nothing of Holdfast but whose default action ends a process, sent to the
    /// supervisor and to both roles (and SIGHUP to the roles, which the supervisor reloads on):
    /// an operator's `kill -ALRM`, SIGUSR1 sent to every holdfast process by name, a realtime signal meant for another
    /// program, SIGXCPU as a `LimitCPU=` sends it. Nothing may change: the same supervisor and
    /// role pids, no role restarted, no upgrade, the counter's every line once; the supervisor
    /// names each signal and its sender once per 10 s however many come. Before, the first of
    /// them (SIGALRM) ended the supervisor, and every container with it.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func straySignalsToEveryHoldfastProcessChangeNothing() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let output = try await Self.startCounter(daemon, id: "counter", token: "stray-out")
        try await eventually("both roles serving", timeout: .seconds(30)) { try await daemon.status().roles.allSatisfy { $0.pid != nil } }
        let before = try await daemon.status()
        let rolePIDs = before.roles.compactMap(\.pid)
        #expect(rolePIDs.count == 2)

        let strays = StraySignals.all
        #expect(strays.contains(SIGALRM) && strays.contains(64) && strays.count >= 40, "\(strays)")
        for signal in strays {
            #expect(kill(daemon.daemonPID, signal) == 0, "\(signalName(signal))")
            for role in rolePIDs { #expect(kill(role, signal) == 0, "\(signalName(signal)) to role \(role)") }
        }
        // And the signals that stop or reload the supervisor: a role is stopped by its SIGTERM
        // alone (INT or QUIT sent by name to every holdfast process ended both roles before).
        for role in rolePIDs { for signal in [SIGHUP, SIGINT, SIGQUIT] { #expect(kill(role, signal) == 0) } }
        // The same signal again and again: said once (the first), the rest counted.
        for _ in 0..<20 { _ = kill(daemon.daemonPID, SIGALRM) }
        try await eventually("each said") {
            strays.allSatisfy { daemon.log.contains("\(signalName($0)) ignored") }
        }
        let atSignals = output.count
        try await eventually("output after the signals") { output.count > atSignals + 200 }
        // A role that a signal ended is seen gone within a moment (its restart counted after).
        try await Task.sleep(for: .milliseconds(500))

        let after = try await daemon.status()
        #expect(after.pid == before.pid && after.upgrades == 0, "the same supervisor, not reloaded")
        #expect(after.roles.map(\.pid) == before.roles.map(\.pid), "the same roles: \(after.roles)")
        #expect(after.roles.map(\.restarts) == before.roles.map(\.restarts), "no role restarted: \(after.roles)")
        #expect(after.processes.first { $0.id == "counter" }?.pid == before.processes.first { $0.id == "counter" }?.pid)
        // The lines reach the file through the log's writer thread: waited for, then counted.
        try await daemon.waitForLog("SIGALRM ignored")
        try await daemon.waitForLog("pid \(getpid()) (uid \(getuid())")
        let log = daemon.log
        #expect(log.components(separatedBy: "SIGALRM ignored").count - 1 == 1, "SIGALRM said once in 10 s however many came")
        #expect(log.contains("pid \(getpid()) (uid \(getuid())"), "the sender named")
        // Every line once, in order, up to the last one printed.
        let numbers = EveryKindOfStream.numbers(Array(output.text.utf8), prefix: "by")
        #expect(!numbers.isEmpty && numbers == Array(1...numbers.last!), "every line once, in order: \(numbers.count) lines")
        print("\(strays.count) stray signals to the supervisor and both roles, SIGHUP to the roles: nothing changed, \(numbers.count) lines exact")
    }

    /// A direct process's parent is the supervisor, so a root one's `kill $PPID` (a script
    /// ending "its shell") stopped the daemon and every container, and SIGHUP reloaded it. Now a
    /// stop or a reload from a child of the supervisor is refused, whether the sender lives on
    /// or exits at once (reaped before the supervisor looks): the same daemon, no upgrade, a
    /// create served after, the refusals logged and counted, a bystander's every line; and a
    /// SIGTERM from outside (this test) still stops it in order. The supervisor's own refusal,
    /// tested with the signal guard off (which otherwise stops these kills at the source:
    /// `aSignalFromAnythingADirectProcessStartsNeverReachesTheSupervisor`).
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func aContainerProcessCannotStopOrReloadItsParentTheSupervisor() async throws {
        let daemon = try await DaemonFixture(
            extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"\nprocesses:\n  signal_guard: false")
        defer { daemon.cleanUp() }
        let output = try await Self.startCounter(daemon, id: "bystander", token: "bystander-out")
        let before = try await daemon.status()

        // One that lives on after each kill, one that exits right after its kills.
        // One after the other: two of one signal pending at once are one signal (the kernel does
        // not queue a standard signal twice), and the count below would be one short (a loaded
        // fresh clone's run counted 6).
        for (id, script) in [
            ("lives-on", "for s in TERM INT QUIT HUP TERM; do kill -s $s $PPID || exit 9; sleep 0.1; done; sleep 1"),
            ("exits-at-once", "kill $PPID && kill -s HUP $PPID"),
        ] {
            _ = try await daemon.launch(ProcessSpec(id: id, argv: ["sh", "-c", script]))
            let report = try await withDeadline("\(id)'s exit", .seconds(30)) { try await daemon.wait(id) }
            #expect(report.exitCode == 0, "\(id): every kill went through: \(report)")
        }
        try await eventually("the refusals said") {
            daemon.log.contains("SIGTERM from a child of the supervisor refused")
                && daemon.log.contains("SIGHUP from a child of the supervisor refused")
                && daemon.log.contains("process=lives-on") && daemon.log.contains("process=exits-at-once")
        }
        _ = try await daemon.launch(ProcessSpec(id: "after", argv: ["sh", "-c", "exit 4"]))
        #expect(try await withDeadline("a create after", .seconds(30)) { try await daemon.wait("after") }.exitCode == 4)
        let after = try await daemon.status()
        #expect(after.pid == before.pid && after.upgrades == 0, "neither stopped nor reloaded")
        let metrics = parsePrometheus(try await httpExchange(
            .unix(path: daemon.directory.file("metrics.sock")), "GET /metrics HTTP/1.1\r\nHost: guest\r\n\r\n"))
        #expect(metrics["holdfast_signals_refused_total"] == 7, "every stop and reload asked by a child: \(metrics["holdfast_signals_refused_total"] ?? -1)")

        let atStop = output.count
        try await eventually("the bystander still streaming") { output.count > atStop + 200 }
        #expect(try await daemon.stop() == .exited(0), "a SIGTERM from outside stops it")
        let numbers = EveryKindOfStream.numbers(Array(output.text.utf8), prefix: "by")
        #expect(!numbers.isEmpty && numbers == Array(1...numbers.last!), "every line once, in order: \(numbers.count) lines")
    }

    /// The supervisor refuses a stop from its own children, but a kill sent by anything they
    /// start is not theirs: a script's external `/bin/kill $PPID`, a builtin kill in a
    /// grandchild shell, `kill -q` (sigqueue), a kill of the supervisor's process group or of
    /// every process (-1). Before, a root direct process's `sh -c '/bin/kill $PPID; …'` stopped
    /// the daemon and every container (the sender, gone when the supervisor looked, could not be
    /// placed). With the signal guard (on by default) each one fails with EPERM in the process:
    /// nothing reaches the supervisor (no refusal counted, same pid, no upgrade), its own
    /// signals still work, `kill -0 $PPID` (sends nothing) answers, and a bystander streams
    /// every line. -1 is tried with SIGURG, which every process ignores unless it asks for it:
    /// a guard that failed must not reach past the test's own daemon.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func aSignalFromAnythingADirectProcessStartsNeverReachesTheSupervisor() async throws {
        let daemon = try await DaemonFixture(extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"")
        defer { daemon.cleanUp() }
        let output = try await Self.startCounter(daemon, id: "bystander", token: "bystander-out")
        let before = try await daemon.status()
        let hasPython = access("/usr/bin/python3", X_OK) == 0
        // Every line: what was tried, and its exit status (0: the signal was sent).
        let script = """
            s=$PPID; g=$(sed 's/.*) //' /proc/$s/stat | cut -d' ' -f3)
            echo "seccomp $(grep '^Seccomp:' /proc/$$/status | cut -f2)"
            /bin/kill -s TERM $s; echo "external-term $?"
            /bin/kill -s HUP $s; echo "external-hup $?"
            /bin/kill -q 7 -s TERM $s; echo "sigqueue $?"
            sh -c "kill -s TERM $s; echo grandchild-builtin \\$?"
            (kill -s TERM $s; echo "subshell-builtin $?")
            kill -s TERM -- -$g; echo "group $?"
            kill -s URG -- -1; echo "every-process $?"
            kill -0 $s; echo "liveness $?"
            kill -0 $$; echo "itself $?"
            sleep 30 & kill -s TERM $!; echo "its-child $?"
            \(hasPython ? "python3 -c \"import os; os.pidfd_open($s)\" 2>/dev/null; echo pidfd $?" : "echo pidfd 1")
            \(hasPython ? Self.signalledOwner(signal: SIGTERM, label: "owner-term") : "echo owner-term 1")
            \(hasPython ? Self.signalledOwner(signal: 32, label: "owner-32") : "echo owner-32 1")
            \(hasPython ? Self.signalledOwner(signal: SIGUSR1, label: "owner-usr1") : "echo owner-usr1 0")
            """
        let attempts = collect(try daemon.streams.open(token: bytes("attempts-out"), direction: .receive))
        _ = try await daemon.launch(ProcessSpec(id: "attacker", argv: ["sh", "-c", script], stdout: daemon.spec("attempts-out")))
        let report = try await withDeadline("the attacker's exit", .seconds(30)) { try await daemon.wait("attacker") }
        let text = String(decoding: await attempts.value, as: UTF8.self)
        print("a direct process's kills of the supervisor, each with its exit status:\n\(text)")
        #expect(report.exitCode == 0, "\(report)")
        let results = attemptResults(text)
        #expect(results["seccomp"] == "2", "the process runs under a seccomp filter")
        for refused in ["external-term", "external-hup", "sigqueue", "grandchild-builtin", "subshell-builtin", "group", "every-process", "pidfd", "owner-term", "owner-32"] {
            // 1: the kill failed (2 would be the shell refusing its own arguments: no kill at all).
            #expect(results[refused] == "1", "\(refused): refused (\(results[refused] ?? "not run"))")
        }
        #expect(results["itself"] == "0" && results["its-child"] == "0", "its own signals go: \(results)")
        #expect(results["liveness"] == "0", "signal 0, which sends nothing, goes: kill -0 $PPID answers as before")
        #expect(results["owner-usr1"] == "0", "F_SETSIG naming a signal the supervisor ignores goes (and is ignored)")

        let after = try await daemon.status()
        #expect(after.pid == before.pid && after.upgrades == 0, "neither stopped nor reloaded")
        let metrics = parsePrometheus(try await httpExchange(
            .unix(path: daemon.directory.file("metrics.sock")), "GET /metrics HTTP/1.1\r\nHost: guest\r\n\r\n"))
        #expect(metrics["holdfast_signals_refused_total"] == 0, "no kill reached the supervisor to be refused there")
        _ = try await daemon.launch(ProcessSpec(id: "after", argv: ["sh", "-c", "exit 4"]))
        #expect(try await withDeadline("a create after", .seconds(30)) { try await daemon.wait("after") }.exitCode == 4)
        let atStop = output.count
        try await eventually("the bystander still streaming") { output.count > atStop + 200 }
        #expect(try await daemon.stop() == .exited(0), "a SIGTERM from outside stops it")
        let numbers = EveryKindOfStream.numbers(Array(output.text.utf8), prefix: "by")
        #expect(!numbers.isEmpty && numbers == Array(1...numbers.last!), "every line once, in order: \(numbers.count) lines")
    }

    /// A shell line that makes the supervisor (`$s`) the owner of a pipe with O_ASYNC, asks the
    /// kernel to signal it `signal` when the pipe becomes readable (F_SETSIG), and writes to
    /// it; echoes `label` and python's exit status (1: the F_SETSIG was refused, nothing sent).
    static func signalledOwner(signal: Int32, label: String) -> String {
        "python3 -c \"import fcntl,os; r,w=os.pipe(); fcntl.fcntl(r,fcntl.F_SETOWN,$s); "
            + "fcntl.fcntl(r,fcntl.F_SETFL,fcntl.fcntl(r,fcntl.F_GETFL)|os.O_ASYNC); fcntl.fcntl(r,10,\(signal)); "
            + "os.write(w,b'x')\" 2>/dev/null; echo \(label) $?"
    }

    /// A stray signal sent in a loop took most of a CPU from the supervisor (about 40 µs of its
    /// time per signal in a debug build; 100,000 in 5 s). Past 20 within a second it is left to
    /// the kernel to discard (SIG_IGN, in /proc's SigIgn) for 10 s, said once, then heard again
    /// (SigCgt); the daemon serves on meanwhile. A realtime signal, which the kernel queues
    /// rather than merges, so every one of them is delivered unless it is ignored.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func aFloodOfOneSignalIsLeftToTheKernelForAWhile() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let signal = StraySignals.all.last!  // SIGRTMAX
        let bit = UInt64(1) << UInt64(signal - 1)
        func mask(_ field: String) -> UInt64? {
            let status = String(decoding: readFile("/proc/\(daemon.daemonPID)/status") ?? [], as: UTF8.self)
            return status.split(separator: "\n").first { $0.hasPrefix(field + ":") }
                .flatMap { UInt64($0.dropFirst(field.count + 1).trimmingCharacters(in: .whitespaces), radix: 16) }
        }
        #expect((try #require(mask("SigCgt"))) & bit != 0, "handled to begin with")
        for _ in 0..<200 { _ = sigqueue(daemon.daemonPID, signal, sigval()) }
        try await eventually("the flood muted") { ((mask("SigIgn") ?? 0) & bit) != 0 }
        // The mask changes first and the line is written after it: wait for the line, not
        // the mask (a loaded run read the log between the two).
        try await eventually("the mute said") {
            daemon.log.contains("\(signalName(signal)) came more than 20 times within 1s: the kernel discards it")
        }
        #expect(daemon.log.components(separatedBy: "\(signalName(signal)) came more than").count - 1 == 1, "said once")
        // Meanwhile the daemon serves, and the muted signal costs it nothing.
        _ = try await daemon.launch(ProcessSpec(id: "during", argv: ["sh", "-c", "exit 6"]))
        #expect(try await withDeadline("a create while muted", .seconds(30)) { try await daemon.wait("during") }.exitCode == 6)
        for _ in 0..<200 { _ = sigqueue(daemon.daemonPID, signal, sigval()) }
        try await eventually("heard again after 10 s", timeout: .seconds(30)) { ((mask("SigCgt") ?? 0) & bit) != 0 }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Starts `endlessCounter` as process `id`, its stdout on the host stream `token`, and
    /// returns that stream once the first line has come.
    static func startCounter(_ daemon: DaemonFixture, id: String, token: String) async throws -> Accumulator {
        let output = Accumulator(try daemon.streams.open(token: bytes(token), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: id, argv: ["sh", "-c", DaemonSignalTests.endlessCounter], stdout: daemon.spec(token)))
        try await eventually("the \(id) streaming") { output.count > 0 }
        return output
    }

    static let endlessCounter = "i=0; while :; do i=$((i+1)); echo by $i || exit 3; [ $((i % 50)) -ne 0 ] || sleep 0.02; done"
}
