import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A stop (SIGTERM: `systemctl stop`, a VM shutting down) that comes while a live upgrade is
/// replacing the image — a package upgrade's reload and an operator's stop at the same moment.
/// Before, the old image's signal loop took it after the upgrade's last "is a stop under way?"
/// check: it began the stop there (every container signalled), then the exec replaced it, and
/// the new image knew nothing of the stop. The daemon ran on: the operator's stop lost, and
/// under systemd a SIGKILL after `TimeoutStopSec` for the whole unit, containers and all, with
/// nothing drained or reported. Now the stop signals are held pending from that check on, and
/// the new image carries the stop out once it has taken over.
@Suite("Live upgrade: a stop asked for while the image is replaced", .serialized, .timeLimit(.minutes(3)))
struct LiveUpgradeStopTests {
    /// `pid`'s exit within 60 s; the daemon's log is recorded if it does not come.
    func exitOf(_ pid: pid_t, _ what: String, _ daemon: DaemonFixture) async throws -> HoldfastPosix.ExitStatus {
        do {
            return try await daemon.processes.wait(pid, timeout: .seconds(60))
        } catch {
            Issue.record("\(what) (pid \(pid)) did not exit: \(error); the daemon's log ends\n\(daemon.log.suffix(6000))")
            throw error
        }
    }

    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the exec waits at a failpoint, which only debug builds have"))
    func aStopAskedForAsTheNewImageIsExecutedIsCarriedOutByIt() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        // The stop comes as the new image starts its roles: its exits reach the host once the
        // new bridge worker is connected, within the shutdown timeout (the default's 30 s; 20 s
        // here, where a loaded run's new worker took seconds).
        let daemon = try await DaemonFixture(
            environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.upgradeExecLate):supervisor"], executable: binary.path, shutdown: ("5s", "20s"))
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let output = collect(try daemon.streams.open(token: bytes("s-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "s", argv: ["sh", "-c", "trap 'echo stopped; exit 7' TERM; i=0; while :; do i=$((i+1)); echo line $i; sleep 0.05; done"],
            stdout: daemon.spec("s-out")))
        let supervisor = daemon.daemonPID
        try binary.install(variant: 1)
        let upgradeOutput = daemon.directory.file("upgrade.out")
        let upgrade = try startUpgrade(daemon, output: upgradeOutput)
        // The state is written down and the exec waits (the failpoint, 3 s): the stop comes now.
        try await daemon.waitForLog("live upgrade: executing the new binary", timeout: .seconds(60))
        #expect(kill(supervisor, SIGTERM) == 0)

        // The new image takes over and stops: the daemon exits 0 on its own.
        let status = try await exitOf(supervisor, "the daemon", daemon)
        #expect(status == .exited(0), "\(daemon.log.suffix(4000))")
        let upgradeStatus = try await exitOf(upgrade, "holdfast upgrade", daemon)
        print("holdfast upgrade with a stop during its exec: \(upgradeStatus): \(String(decoding: readFile(upgradeOutput) ?? [], as: UTF8.self))")

        // It was the new image that stopped: the old one never began the stop.
        let log = daemon.log
        let resumed = try #require(log.range(of: "holdfast daemon resumed after a live upgrade"), "the new image took over: \(log.suffix(4000))")
        let stopping = try #require(log.range(of: "shutting down"), "a stop: \(log.suffix(4000))")
        #expect(resumed.upperBound <= stopping.lowerBound, "the stop began in the new image: \(log.suffix(4000))")
        #expect(log.components(separatedBy: "shutting down").count == 2, "one stop")

        // The process was stopped by it, its output whole, its exit reported once.
        do {
            try await eventually("the exit at the host", timeout: .seconds(30)) { exits.count("s") == 1 }
        } catch {
            Issue.record("\(error); the daemon's log ends\n\(daemon.log.suffix(5000))")
            throw error
        }
        let report = try #require(exits.all.first { $0.id == "s" })
        #expect(report.exitCode == 7 && report.lost == nil, "ended by the stop's SIGTERM: \(report)")
        let text = String(decoding: await output.value, as: UTF8.self)
        let lines = text.split(separator: "\n").map(String.init)
        #expect(lines.last == "stopped", "the trap ran at the stop: \(text.suffix(200))")
        let counted = lines.dropLast()
        #expect(!counted.isEmpty && counted.elementsEqual((1...counted.count).map { "line \($0)" }), "every line once, in order")
    }

    /// A container's `kill $PPID` (a direct process's parent is the supervisor) that comes while
    /// the stops are held for the exec: it reaches the new image with its sender, which refuses
    /// it as it refuses any child's stop. Held without its sender, it would have come from the
    /// supervisor itself, and the new image would have stopped, every container with it. (With
    /// the signal guard off: on, the kill never leaves the container.)
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the exec waits at a failpoint, which only debug builds have"))
    func aChildsStopHeldAcrossTheExecIsStillRefused() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let daemon = try await DaemonFixture(
            environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.upgradeExecLate):supervisor", "HOLDFAST_PROCESSES_SIGNAL_GUARD": "false"],
            executable: binary.path)
        defer { daemon.cleanUp() }
        let go = daemon.directory.file("go")
        let sent = daemon.directory.file("sent")
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "k", argv: ["sh", "-c", "while [ ! -e \(go) ]; do sleep 0.02; done; kill -TERM $PPID; touch \(sent); exec sleep 1000"]))
        let supervisor = daemon.daemonPID
        try binary.install(variant: 1)
        let upgradeOutput = daemon.directory.file("upgrade.out")
        let upgrade = try startUpgrade(daemon, output: upgradeOutput)
        do {
            try await daemon.waitForLog("live upgrade: executing the new binary", timeout: .seconds(60))
        } catch {
            // Once seen in a loaded full suite: say what the upgrade and the daemon said.
            Issue.record("\(error); holdfast upgrade said: \(String(decoding: readFile(upgradeOutput) ?? [], as: UTF8.self)); the daemon's log ends \(daemon.log.suffix(4000))")
            throw error
        }
        try writeFile(go, [])
        try await eventually("the container's kill sent") { access(sent, F_OK) == 0 }

        let upgradeStatus = try await exitOf(upgrade, "holdfast upgrade", daemon)
        let said = String(decoding: readFile(upgradeOutput) ?? [], as: UTF8.self)
        #expect(upgradeStatus == .exited(0), "the upgrade went through: \(said)")
        try await daemon.waitForLog("from a child of the supervisor refused")
        let log = daemon.log
        let resumed = try #require(log.range(of: "holdfast daemon resumed after a live upgrade"))
        let refused = try #require(log.range(of: "from a child of the supervisor refused"))
        #expect(resumed.upperBound <= refused.lowerBound, "refused by the new image: \(log.suffix(3000))")
        #expect(!log.contains("shutting down"), "no stop: \(log.suffix(3000))")
        let after = try await daemon.status()
        #expect(after.pid == supervisor && after.upgrades == 1 && after.processes.contains { $0.id == "k" }, "the same daemon runs on, the process too")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A stop that comes while the new binary is checked, and is still stopping the processes
    /// when the check ends: the upgrade gives way before it stops anything. Before, it went on to
    /// stop the bridge worker (the exits' way to the host) and the broker (the stop's drains)
    /// under the stop, and only then noticed it and started them again.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aStopDuringTheChecksEndsTheUpgradeBeforeItStopsAnything() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let (real, standInPath) = try binary.prepareStandIn()
        let daemon = try await DaemonFixture(environment: ["PATH": standInPath], executable: binary.path, shutdown: ("15s", "30s"))
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let output = collect(try daemon.streams.open(token: bytes("c-out"), direction: .receive))
        // It takes 5 s to stop once asked, printing all along: the stop is under way when the
        // check ends.
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "c",
            argv: ["sh", "-c", "trap 'i=0; while [ $i -lt 50 ]; do i=$((i+1)); echo stopping $i; sleep 0.1; done; echo stopped; exit 7' TERM; i=0; while :; do i=$((i+1)); echo line $i; sleep 0.05; done"],
            stdout: daemon.spec("c-out")))
        let supervisor = daemon.daemonPID
        let checking = try standInCheck(binary, real: real, daemon, seconds: 2)
        let upgradeOutput = daemon.directory.file("upgrade.out")
        let upgrade = try startUpgrade(daemon, output: upgradeOutput)
        try await eventually("the new binary's check started", timeout: .seconds(30)) { access(checking, F_OK) == 0 }
        #expect(kill(supervisor, SIGTERM) == 0)

        let upgradeStatus = try await exitOf(upgrade, "holdfast upgrade", daemon)
        let said = String(decoding: readFile(upgradeOutput) ?? [], as: UTF8.self)
        print("holdfast upgrade with a stop during its check: \(upgradeStatus): \(said)")
        #expect(upgradeStatus == .exited(1) && said.contains("the daemon began to stop"), "the upgrade gave way: \(said)")
        let status = try await exitOf(supervisor, "the daemon", daemon)
        #expect(status == .exited(0), "\(daemon.log.suffix(4000))")
        let log = daemon.log
        #expect(!log.contains("stopping the roles"), "the upgrade stopped no role under the stop: \(log.suffix(4000))")
        #expect(!log.contains("holdfast daemon resumed after a live upgrade"), "no new image")

        try await eventually("the exit at the host", timeout: .seconds(30)) { exits.count("c") == 1 }
        let report = try #require(exits.all.first { $0.id == "c" })
        #expect(report.exitCode == 7 && report.lost == nil && report.outputCutShort != true, "ended by the stop's SIGTERM, drained: \(report)")
        let lines = String(decoding: await output.value, as: UTF8.self).split(separator: "\n").map(String.init)
        let counted = lines.prefix { $0.hasPrefix("line ") }
        #expect(!counted.isEmpty && counted.elementsEqual((1...counted.count).map { "line \($0)" }), "every line once, in order")
        #expect(Array(lines.dropFirst(counted.count)) == (1...50).map { "stopping \($0)" } + ["stopped"], "every line of its stop: \(lines.suffix(3))")
    }

    /// A stop that ends the daemon while `holdfast upgrade` waits for its answer: the client says
    /// the daemon is gone at once. Before, the stop removed the control socket's file, so the
    /// client never saw it refused and waited its whole timeout (60 s here).
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func anUpgradeWhoseDaemonStopsMeanwhileSaysSoAtOnce() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let (real, standInPath) = try binary.prepareStandIn()
        let daemon = try await DaemonFixture(environment: ["PATH": standInPath], executable: binary.path)
        defer { daemon.cleanUp() }
        _ = try await daemon.bridge.create(ProcessSpec(id: "c", argv: ["sleep", "1000"]))
        let supervisor = daemon.daemonPID
        let checking = try standInCheck(binary, real: real, daemon, seconds: 3)
        let upgradeOutput = daemon.directory.file("upgrade.out")
        let upgrade = try startUpgrade(daemon, output: upgradeOutput, timeout: 60)
        try await eventually("the new binary's check started", timeout: .seconds(30)) { access(checking, F_OK) == 0 }
        #expect(kill(supervisor, SIGTERM) == 0)
        #expect(try await exitOf(supervisor, "the daemon", daemon) == .exited(0))

        let upgradeStatus = try await exitOf(upgrade, "holdfast upgrade", daemon)
        let said = String(decoding: readFile(upgradeOutput) ?? [], as: UTF8.self)
        print("holdfast upgrade whose daemon stopped meanwhile: \(upgradeStatus): \(said)")
        #expect(upgradeStatus == .exited(1))
        // Said when the daemon's process was seen gone, before the 60 s timeout (whose words are
        // "did not come back"): the words tell, no time is asserted.
        #expect(said.contains("is gone: it exited during the upgrade") && said.contains("a stop came meanwhile"), "\(said)")
        #expect(!said.contains("did not come back from the upgrade"), "not the timeout: \(said)")
    }
}
