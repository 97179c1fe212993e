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

/// The daemon's binary in a directory of its own, replaced there the way a package upgrade
/// replaces /usr/bin/holdfast (a new file renamed over the path): each `install` puts a copy of
/// the built binary with distinct bytes appended (an ELF file with trailing bytes still runs),
/// so every upgrade lands on a binary with another sha256.
struct InstalledBinary {
    let directory: TemporaryDirectory
    let path: String
    let original: [UInt8]

    init() throws {
        directory = try TemporaryDirectory("holdfast-binary")
        chmod(directory.path, 0o755)
        path = directory.file("holdfast")
        original = try #require(readFile(holdfastExecutable()))
        try replace(with: original, mode: 0o755)
    }

    /// A new file at the path, as dpkg does: written aside, then renamed over it.
    func replace(with bytes: [UInt8], mode: mode_t) throws {
        let aside = directory.file(".holdfast.new")
        try writeFile(aside, bytes, mode: mode)
        chmod(aside, mode)
        #expect(rename(aside, path) == 0)
    }

    /// The built binary with `variant`'s bytes appended; returns its sha256.
    @discardableResult
    func install(variant: Int) throws -> String {
        let bytes = original + Array("\nholdfast test build \(variant)\n".utf8)
        try replace(with: bytes, mode: 0o755)
        return sha256Hex(bytes)
    }

    func remove() { directory.remove() }

    /// A stand-in new binary (the daemon execs by fd, which a script cannot be): a copy of the
    /// real one, and a directory for `daemon`, first on the returned PATH, which env(1) put at
    /// the daemon's path runs (`installStandIn`). The script runs as the daemon's pid: every
    /// container process is its child, so it must fork nothing it waits for (a shell's wait
    /// reaps whichever child exits then).
    func prepareStandIn() throws -> (real: String, path: String) {
        let real = directory.file("real-holdfast")
        try writeFile(real, original, mode: 0o755)
        chmod(real, 0o755)
        mkdir(directory.file("bin"), 0o755)
        let inherited = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
        return (real, "\(directory.file("bin")):\(inherited)")
    }

    /// `script` as `daemon`, and env(1) at the daemon's path: the next upgrade runs the script.
    func installStandIn(script: String) throws {
        let daemon = directory.file("bin") + "/daemon"
        try writeFile(daemon, Array(script.utf8), mode: 0o755)
        chmod(daemon, 0o755)
        guard let env = readFile("/usr/bin/env") else { throw SystemError.last("read(/usr/bin/env)") }
        try replace(with: env, mode: 0o755)
    }
}

/// `holdfast upgrade --socket` against the fixture's daemon: its exit status and what it said.
func runUpgrade(_ daemon: DaemonFixture, processes: TestProcesses) async throws -> (status: HoldfastPosix.ExitStatus, output: String) {
    let outputPath = daemon.directory.file("upgrade-\(UInt64.random(in: 0...UInt64.max)).out")
    let out = open(outputPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    defer { unlink(outputPath) }
    let pid = try processes.start(
        [holdfastExecutable(), "upgrade", "--socket", daemon.directory.file("control.sock")], stdout: out, stderr: out)
    close(out)
    let status = try await processes.wait(pid, timeout: .seconds(90))
    return (status, String(decoding: readFile(outputPath) ?? [], as: UTF8.self))
}

/// The new binary's check (a process of its own, not the daemon's pid) as a stand-in: it
/// says it started (the returned file), waits `seconds`, then runs the real check — or, when
/// `passes` is false, fails it, as a binary that cannot read the state would.
func standInCheck(_ binary: InstalledBinary, real: String, _ daemon: DaemonFixture, seconds: Int, passes: Bool = true) throws -> String {
    let checking = daemon.directory.file("checking")
    try binary.installStandIn(script: """
            #!/bin/sh
            if [ "$3" = "--check-resume-snapshot" ]; then
              touch \(checking); sleep \(seconds)\(passes ? "" : "; echo 'this stand-in cannot read the state'; exit 1")
            fi
            exec \(real) daemon "$@"

            """)
    return checking
}

/// `holdfast upgrade` started (not waited for), what it says going to `output`.
func startUpgrade(_ daemon: DaemonFixture, output: String, timeout: Int? = nil) throws -> pid_t {
    let out = open(output, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    defer { close(out) }
    return try daemon.processes.start(
        [holdfastExecutable(), "upgrade", "--socket", daemon.directory.file("control.sock")] + (timeout.map { ["--timeout", String($0)] } ?? []),
        stdout: out, stderr: out)
}

@Suite("Live upgrade: a new binary takes over running processes with nothing lost", .serialized, .timeLimit(.minutes(5)))
struct LiveUpgradeTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func oneUpgradeKeepsThePidTheProcessAndEveryByte() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        // The metrics endpoint's listener is passed across the exec too.
        let daemon = try await DaemonFixture(extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"", executable: binary.path)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let copy = daemon.directory.file("stdin.copy")
        let output = collect(try daemon.streams.open(token: bytes("u-out"), direction: .receive))
        let input = try daemon.streams.open(token: bytes("u-in"), direction: .send)
        let pid = try await daemon.bridge.create(ProcessSpec(
            id: "u", argv: ["sh", "-c", "exec 3<&0; cat <&3 > \(copy) & exec 3<&-; i=0; while [ $i -lt 3000 ]; do i=$((i+1)); echo line $i; [ $((i % 50)) -ne 0 ] || sleep 0.02; done; wait"],
            stdin: daemon.spec("u-in"), stdout: daemon.spec("u-out")))
        let before = try await daemon.status()
        let instance = try #require(daemon.bridge.lastHello?.instanceID)
        let typist = NumberedTypist { try await input.send($0) }
        try await Task.sleep(for: .milliseconds(300))
        let sha = try binary.install(variant: 1)
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)\n\(daemon.log.suffix(4000))")
        let after = try await daemon.status()
        #expect(after.pid == before.pid, "the same supervisor")
        #expect(after.upgrades == 1)
        #expect(after.executableSHA256 == sha, "the new binary runs")
        #expect(after.processes.first { $0.id == "u" }?.pid == pid)
        do {
            try await eventually("the bridge back", timeout: .seconds(30)) { daemon.bridge.lastHello?.upgrades == 1 }
        } catch {
            Issue.record("hello: \(String(describing: daemon.bridge.lastHello))\n\(daemon.log.suffix(8000))")
            throw error
        }
        #expect(daemon.bridge.lastHello?.instanceID == instance, "the same instance: an upgrade, not a restart")
        // The log says why the broker changed: the upgrade, not a crash (the line waited for: it
        // reaches the file through the log's writer thread, maybe after the upgrade's answer).
        try await daemon.waitForLog("the restarted broker took processes over")
        #expect(daemon.log.contains("the restarted broker took processes over") && daemon.log.contains("after=a live upgrade"), "\(daemon.log.suffix(3000))")
        #expect(!daemon.log.contains("crashed broker"))
        let metrics = try await httpExchange(.unix(path: daemon.directory.file("metrics.sock")), "GET /metrics HTTP/1.0\r\n\r\n")
        #expect(metrics.hasPrefix("HTTP/1.") && metrics.contains("holdfast_"), "the metrics endpoint serves after the upgrade: \(metrics.prefix(200))")
        try await Task.sleep(for: .milliseconds(300))
        let sent = await typist.stop()
        #expect(await input.finish() == 0)
        // The host's copy of the exit: created over the bridge, the process is forgotten once
        // the host acknowledges it, and a `wait` on the control socket after that finds none.
        try await eventually("the exit at the host", timeout: .seconds(60)) { exits.count("u") == 1 }
        let report = try #require(exits.all.first { $0.id == "u" })
        #expect(report.exitCode == 0 && report.lost == nil && report.inputRepeated == nil, "\(report)")
        #expect(await output.value == expectedLines(3000), "every output byte once, in order")
        try await eventually("cat's copy complete", timeout: .seconds(20)) { (readFile(copy) ?? []).count >= sent.count }
        #expect(readFile(copy) == sent, "stdin exact: \(sent.count) bytes")
        print("one live upgrade: \(upgrade.output)")
        #expect(try await daemon.stop() == .exited(0))
    }

    static let upgrades = 20

    /// Issue 17's "done when": 20 live upgrades in a row, each onto a binary with another
    /// sha256, while pipes and a terminal stream both ways (resumable), a raw-mode output prints,
    /// a runc container prints (where runc is), and a process a runtime handed over on the
    /// handoff socket prints; creates go out over the bridge throughout, the switches included.
    /// The supervisor and every process keep their pids, every byte arrives exactly (no gap, no
    /// repeat: the broker quiesces instead of crashing), every exit is reported once, every
    /// create runs.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func twentyUpgradesWhileEveryKindOfStreamFlows() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let daemon = try await DaemonFixture(executable: binary.path)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let streams = try await EveryKindOfStream(daemon)
        defer { streams.close() }
        let ids = streams.ids
        let first = try await daemon.status()
        let pids = Dictionary(uniqueKeysWithValues: first.processes.map { ($0.id, $0.pid) })
        let instance = try #require(daemon.bridge.lastHello?.instanceID)
        let descriptorsBefore = openDescriptorCount(pid: daemon.daemonPID)

        let typist = NumberedTypist { try await streams.pipeIn.send($0) }
        let ttyTypist = NumberedTypist { try await streams.ttyIn.send($0) }
        // Creates over the bridge all along: before, during and after each switch.
        let creating = NIOLockedValueBox(true)
        let creator = Task { () -> (ids: [String], waited: Int) in
            var created: [String] = []
            // Creates sent to one binary and answered after the next one's hello: they came
            // while the daemon was switching binaries (a fact, not a latency).
            var waited = 0
            while creating.withLockedValue({ $0 }) {
                let id = "create-\(created.count + 1)"
                do {
                    let sentTo = daemon.bridge.lastHello?.upgrades
                    _ = try await daemon.bridge.create(ProcessSpec(id: id, argv: ["sh", "-c", "exit 7"]))
                    if daemon.bridge.lastHello?.upgrades != sentTo { waited += 1 }
                    created.append(id)
                } catch {
                    Issue.record("create \(id) refused: \(error)")
                    break
                }
                try? await Task.sleep(for: .milliseconds(Int.random(in: 5...40)))
            }
            return (created, waited)
        }
        // And over the control socket, a new connection each (as `holdfast`-style tools do):
        // one that connects during a switch waits in the listener's backlog, or parked, for
        // the binary that runs on.
        let launcher = Task { () -> [String] in
            var launched: [String] = []
            while creating.withLockedValue({ $0 }) {
                let id = "launch-\(launched.count + 1)"
                do {
                    _ = try await daemon.launch(ProcessSpec(id: id, argv: ["sh", "-c", "exit 9"]))
                    launched.append(id)
                } catch {
                    Issue.record("launch \(id) failed: \(error)")
                    break
                }
                try? await Task.sleep(for: .milliseconds(Int.random(in: 5...40)))
            }
            return launched
        }
        var switches: [Duration] = []
        for round in 1...Self.upgrades {
            let sha = try binary.install(variant: round)
            let started = ContinuousClock.now
            let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
            switches.append(ContinuousClock.now - started)
            guard upgrade.status == .exited(0) else {
                Issue.record("upgrade \(round): \(upgrade.status): \(upgrade.output)\n\(daemon.log.suffix(6000))")
                break
            }
            let now = try await daemon.status()
            #expect(now.pid == first.pid, "upgrade \(round): the same supervisor")
            #expect(now.upgrades == round)
            #expect(now.executableSHA256 == sha, "upgrade \(round): the new binary runs")
            for id in streams.ids { #expect(now.processes.first { $0.id == id }?.pid == pids[id], "upgrade \(round): \(id) is the same process") }
            try await Task.sleep(for: .milliseconds(Int.random(in: 50...300)))
        }
        creating.withLockedValue { $0 = false }
        let (created, waitedCreates) = await creator.value
        let launched = await launcher.value
        try await eventually("the bridge after the last upgrade", timeout: .seconds(30)) { daemon.bridge.lastHello?.upgrades == Self.upgrades }
        #expect(daemon.bridge.lastHello?.instanceID == instance, "one instance throughout: the host sees upgrades, not restarts")
        #expect(daemon.bridge.lastHello?.daemonVersion == HoldfastVersion.string)
        let descriptorsAfter = openDescriptorCount(pid: daemon.daemonPID)
        #expect(waitedCreates > 0, "some creates came while the daemon switched binaries")
        print("live upgrade: \(waitedCreates) of \(created.count) creates spanned a switch")

        try await Task.sleep(for: .milliseconds(300))
        let sent = await typist.stop()
        let ttySent = await ttyTypist.stop()
        #expect(await streams.pipeIn.finish() == 0, "every stdin byte acknowledged")
        try await streams.waitForTerminalCopy(of: ttySent)
        try await streams.stopAll()
        do {
            try await eventually("every exit", timeout: .seconds(60)) { (ids + created).allSatisfy { exits.count($0) >= 1 } }
        } catch {
            // Every line the daemon logged about the missing ones (and its warnings), not only
            // the tail: what a miss needs to be explained.
            let missing = (ids + created).filter { exits.count($0) == 0 }
            let lines = daemon.log.split(separator: "\n").filter { line in
                missing.contains { line.contains("process=\($0) ") || line.hasSuffix("process=\($0)") } || line.contains(" warning ")
                    || line.contains(" error ") || line.contains("live upgrade")
            }
            Issue.record("missing exits: \(missing); \(exits.all.count) arrived; created \(created.count)\n\(lines.suffix(400).joined(separator: "\n"))")
            throw error
        }
        try await Task.sleep(for: .milliseconds(300))
        #expect(exits.all.count == ids.count + created.count, "each exit once: \(exits.all.count) for \(ids.count + created.count) processes")
        for report in exits.all where ids.contains(report.id) {
            #expect(report.signal == streams.stopSignal(report.id), "ended by our signal: \(report)")
            #expect(report.lost == nil && report.inputRepeated == nil, "nothing lost or repeated: \(report)")
        }
        #expect(exits.all.filter { $0.id.hasPrefix("create-") }.allSatisfy { $0.exitCode == 7 }, "every create ran")
        // The control socket's processes: each one ran (its exit code is the program's).
        for id in launched {
            let report = try await withTimeout("\(id)'s exit", .seconds(30)) { try await daemon.wait(id) }
            #expect(report.exitCode == 9, "\(id): \(report)")
        }
        // Every output exact, up to its last line: no gaps at all; stdin and the terminal's input exact.
        let summary = try await streams.checkOutputs(stdinSent: sent, ttySent: ttySent)
        #expect(descriptorsAfter <= descriptorsBefore + 2, "the supervisor's fds: \(descriptorsBefore) before, \(descriptorsAfter) after \(Self.upgrades) upgrades")
        let sorted = switches.sorted()
        print("\(Self.upgrades) live upgrades (request to both roles serving, CLI included): median \(sorted[sorted.count / 2]), max \(sorted.last!); "
            + summary + "; \(created.count) creates over the bridge (\(waitedCreates) waited for a switch) and \(launched.count) on the control socket, all run; supervisor fds \(descriptorsBefore) -> \(descriptorsAfter)")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Issue 17's item 2: a missing, non-executable, others-writable or corrupt binary, one whose check fails,
    /// crashes, or reads another version of the state: each upgrade is refused with its
    /// reason (`holdfast upgrade` exits 1), and the old daemon still serves — the same pid, no
    /// upgrade counted, a process it ran all along streams on exactly, a new create runs and
    /// its output arrives. Then a good binary upgrades as usual.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aFailedUpgradeChangesNothingAndTheOldDaemonServes() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let real = binary.directory.file("real-holdfast")
        try writeFile(real, binary.original, mode: 0o755)
        chmod(real, 0o755)
        let daemon = try await DaemonFixture(executable: binary.path)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let steady = collect(try daemon.streams.open(token: bytes("s-out"), direction: .receive))
        let steadyPID = try await daemon.bridge.create(ProcessSpec(
            id: "steady", argv: counterCommand(4000, prefix: "steady", pause: "0.002"), stdout: daemon.spec("s-out")))
        let before = try await daemon.status()
        let state = binary.directory.file("state.json")
        func script(_ body: String) -> [UInt8] { Array("#!/bin/sh\n\(body)\n".utf8) }
        let cases: [(name: String, install: () throws -> Void, says: String)] = [
            ("missing", { unlink(binary.path) }, "cannot open the new binary \(binary.path): No such file or directory"),
            ("not executable", { try binary.replace(with: binary.original, mode: 0o644) }, "is not executable (mode 644)"),
            ("writable by others", { try binary.replace(with: binary.original, mode: 0o777) }, "could have been written by another user"),
            ("corrupt", { try binary.replace(with: (0..<65536).map { _ in UInt8.random(in: 0...255) }, mode: 0o755) }, "not a program the kernel runs"),
            ("check fails", { try binary.replace(with: script("echo 'holdfast 9.9: cannot read this' >&2; exit 3"), mode: 0o755) },
             "failed its check (exit code 3): holdfast 9.9: cannot read this"),
            ("check crashes", { try binary.replace(with: script("kill -SEGV $$"), mode: 0o755) }, "failed its check (killed by signal 11"),
            // The real binary, which could not start its I/O reactor here (every epoll watch of
            // root's uid taken: a debug-build failpoint makes the kernel's ENOSPC): the new image
            // would die at its start, and the previous one taken back with it.
            ("no I/O reactor", {
                try binary.replace(
                    with: script("HOLDFAST_FAILPOINT=\(Failpoint.upgradeCheckReactorFails):check exec \(real) \"$@\""), mode: 0o755)
            }, Failpoint.compiledIn ? "cannot start its I/O reactor here: epoll_ctl(ADD, eventfd)" : "cannot execute \(binary.path)"),
            // The real binary, handed the state as a newer daemon would write it (version 2).
            ("another state version", {
                try binary.replace(with: script("sed 's/\"version\":1/\"version\":2/g' /proc/self/fd/$5 > \(state); exec \(real) \"$1\" \"$2\" \"$3\" \"$4\" 9 9<\(state)"), mode: 0o755)
            }, "the upgrade state was written as version 2"),
            // A script passes the check (run by path) but cannot be exec'd from its fd: the exec
            // itself fails after the roles were stopped, and the daemon brings them back.
            ("exec fails", { try binary.replace(with: script("echo 'all good'"), mode: 0o755) }, "cannot execute \(binary.path)"),
        ]
        for (index, failure) in cases.enumerated() {
            try failure.install()
            let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
            #expect(upgrade.status == .exited(1), "\(failure.name): \(upgrade.status) \(upgrade.output)")
            #expect(upgrade.output.contains("upgrade failed: the upgrade did not happen") && upgrade.output.contains(failure.says), "\(failure.name): \(upgrade.output)")
            // The check's reason alone: not a start-up warning of its own (a daemon without
            // CAP_SYS_RESOURCE, as here, once put "cannot protect the supervisor" first).
            #expect(!upgrade.output.contains("cannot protect the supervisor"), "\(failure.name): \(upgrade.output)")
            try await eventually("both roles running", timeout: .seconds(30)) {
                try await daemon.status().roles.allSatisfy { $0.pid != nil }
            }
            let now = try await daemon.status()
            #expect(now.pid == before.pid && (now.upgrades ?? 0) == 0 && now.executableSHA256 == before.executableSHA256, "\(failure.name): the old daemon runs on")
            #expect(now.processes.first { $0.id == "steady" }?.pid == steadyPID)
            // It serves: a create runs, its output arrives, its exit is reported.
            let id = "after-\(index)"
            let output = collect(try daemon.streams.open(token: bytes(id), direction: .receive))
            _ = try await daemon.bridge.create(ProcessSpec(id: id, argv: ["echo", "served after: \(failure.name)"], stdout: daemon.spec(id)))
            #expect(try await withTimeout("\(id)'s output", .seconds(30)) { await output.value } == bytes("served after: \(failure.name)\n"))
            try await eventually("\(id)'s exit", timeout: .seconds(30)) { exits.count(id) == 1 }
            print("refused (\(failure.name)): \(upgrade.output.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        // A good binary again: the daemon upgrades as if nothing had happened.
        let sha = try binary.install(variant: 1)
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        let after = try await daemon.status()
        #expect(after.pid == before.pid && after.upgrades == 1 && after.executableSHA256 == sha)
        #expect(try await withTimeout("steady's output", .seconds(60)) { await steady.value } == expectedLines(4000, prefix: "steady"))
        try await eventually("steady's exit", timeout: .seconds(30)) { exits.count("steady") == 1 }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// The new image holds SIGTERM, SIGINT and the other signals it handles blocked across the
    /// exec (so one in the gap waits for its handlers); the mask is per thread, so they must be unblocked on a thread that
    /// stays: the main thread (libdispatch's workers block nearly every signal, and end when
    /// idle). Checked in /proc; then the upgraded daemon still sees a child exit and stops on
    /// SIGTERM, in order.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func anUpgradedDaemonHearsSignalsOnItsMainThread() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let daemon = try await DaemonFixture(executable: binary.path)
        defer { daemon.cleanUp() }
        try binary.install(variant: 1)
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        let status = String(decoding: readFile("/proc/\(daemon.daemonPID)/task/\(daemon.daemonPID)/status") ?? [], as: UTF8.self)
        let blocked = status.split(separator: "\n").first { $0.hasPrefix("SigBlk:") }.flatMap { UInt64($0.dropFirst(7).trimmingCharacters(in: .whitespaces), radix: 16) }
        let mask = try #require(blocked, "SigBlk of the main thread: \(status)")
        for signal in [SIGTERM, SIGINT, SIGQUIT, SIGHUP] + StraySignals.all {
            #expect(mask & (1 << UInt64(signal - 1)) == 0, "the main thread takes \(signalName(signal)): SigBlk \(String(mask, radix: 16))")
        }
        _ = try await daemon.launch(ProcessSpec(id: "late", argv: ["sh", "-c", "exit 5"]))
        let report = try await withTimeout("the late process's exit", .seconds(30)) { try await daemon.wait("late") }
        #expect(report.exitCode == 5)
        #expect(try await daemon.stop() == .exited(0), "SIGTERM heard: \(daemon.log.suffix(2000))")
    }
}
