import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A reload (SIGHUP) asked for while a live upgrade is under way. That upgrade checked the binary
/// at the daemon's path before the ask, and the ask may be there because a newer one has landed
/// since (a package upgrade over an operator's reload). Before, it was answered "another upgrade
/// is under way" in a log line and dropped: the daemon ran on with the older binary, no client
/// to say so. Now one more reload follows the upgrade under way: in this image if that one
/// fails, in the next one if it succeeds; any number of them make one.
@Suite("Live upgrade: a reload asked for during one follows it; its asker killed does not stop it", .serialized, .timeLimit(.minutes(3)))
struct LiveUpgradeReloadTests {
    /// SIGHUPs (three) while the new binary is checked, a newer binary at the path meanwhile:
    /// the upgrade under way finishes, then exactly one more, onto the newest binary, with the
    /// same pid, the same process, and its every line once.
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the check waits at a failpoint, which only debug builds have"))
    func hangupsDuringTheCheckAreFollowedByOneReloadOntoTheNewestBinary() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let (daemon, output, before, _, upgrade) = try await Self.upgradeBeingChecked(binary)
        defer { daemon.cleanUp() }

        let newest = try binary.install(variant: 2)
        for _ in 0..<3 { #expect(kill(daemon.daemonPID, SIGHUP) == 0) }
        // The check takes 3 s (the failpoint): a test process starved for longer (a fresh
        // clone's loaded run) sends the SIGHUPs after it, as the state is written down, and they
        // are held across the exec instead (`aHangupAsTheNewImageIsExecutedReloadsTheNewImage`).
        let duringTheCheck = Self.checkRunning(for: daemon)
        #expect(try await daemon.processes.wait(upgrade, timeout: .seconds(60)) == .exited(0), "the upgrade under way went through")

        try await eventually("the reload that followed", timeout: .seconds(60)) { (try? await daemon.status())?.upgrades == 2 }
        if duringTheCheck {
            try await daemon.waitForLog("reloading again: a SIGHUP came during the live upgrade")
            #expect(daemon.log.contains("SIGHUP during a live upgrade: another reload follows it"), "taken during the check")
        } else {
            print("the SIGHUPs came after the check (a loaded machine): the reload followed through the exec instead")
        }
        let after = try await daemon.status()
        #expect(after.pid == before.pid && after.executableSHA256 == newest, "the same supervisor, the newest binary")
        #expect(after.processes.first { $0.id == "counter" }?.pid == before.processes.first { $0.id == "counter" }?.pid, "the same process")
        // One reload for the three: nothing more comes.
        try await Task.sleep(for: .seconds(2))
        #expect(try await daemon.status().upgrades == 2, "one reload followed, not three")
        #expect(daemon.log.components(separatedBy: "reloading again").count == (duringTheCheck ? 2 : 1))

        let lines = try await Self.stopCountingEveryLine(daemon, output)
        print("SIGHUP x3 during an upgrade's check: 2 upgrades (\(before.executableSHA256?.prefix(12) ?? "?") -> \(newest.prefix(12))), \(lines) lines exact")
    }

    /// A SIGHUP that comes once the state is being written down (the exec waits at a failpoint)
    /// is held with the stops: it crosses the exec, pending, and the new image reloads again.
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the exec waits at a failpoint, which only debug builds have"))
    func aHangupAsTheNewImageIsExecutedReloadsTheNewImage() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let daemon = try await DaemonFixture(
            environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.upgradeExecLate):supervisor"], executable: binary.path)
        defer { daemon.cleanUp() }
        let before = try await daemon.status()
        try binary.install(variant: 1)
        let upgrade = try startUpgrade(daemon, output: daemon.directory.file("upgrade.out"))
        try await daemon.waitForLog("live upgrade: executing the new binary", timeout: .seconds(60))
        let newest = try binary.install(variant: 2)
        #expect(kill(daemon.daemonPID, SIGHUP) == 0)
        #expect(try await daemon.processes.wait(upgrade, timeout: .seconds(60)) == .exited(0))

        try await eventually("the reload in the new image", timeout: .seconds(60)) { (try? await daemon.status())?.upgrades == 2 }
        let after = try await daemon.status()
        #expect(after.pid == before.pid && after.executableSHA256 == newest, "the newest binary runs")
        let log = daemon.log
        let resumed = try #require(log.range(of: "holdfast daemon resumed after a live upgrade"))
        let reload = try #require(log.range(of: "SIGHUP: reloading"), "\(log.suffix(3000))")
        #expect(resumed.upperBound <= reload.lowerBound, "the new image took the SIGHUP: \(log.suffix(3000))")
        #expect(!log.contains("no reload"), "\(log.suffix(3000))")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A SIGHUP during an upgrade that fails (the new binary cannot take the state), a good
    /// binary at the path meanwhile: the reload follows at once, in the same image.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aHangupDuringAnUpgradeThatFailsReloadsWhenItEnds() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let (real, standInPath) = try binary.prepareStandIn()
        let daemon = try await DaemonFixture(environment: ["PATH": standInPath], executable: binary.path)
        defer { daemon.cleanUp() }
        _ = try await daemon.bridge.create(ProcessSpec(id: "c", argv: ["sleep", "1000"]))
        let before = try await daemon.status()
        let checking = try standInCheck(binary, real: real, daemon, seconds: 2, passes: false)
        let upgradeOutput = daemon.directory.file("upgrade.out")
        let upgrade = try startUpgrade(daemon, output: upgradeOutput)
        try await eventually("the new binary's check started", timeout: .seconds(30)) { access(checking, F_OK) == 0 }
        let good = try binary.install(variant: 1)
        #expect(kill(daemon.daemonPID, SIGHUP) == 0)

        #expect(try await daemon.processes.wait(upgrade, timeout: .seconds(60)) == .exited(1), "the stand-in's upgrade failed")
        let said = String(decoding: readFile(upgradeOutput) ?? [], as: UTF8.self)
        #expect(said.contains("cannot read the state"), "\(said)")
        try await eventually("the reload that followed", timeout: .seconds(60)) { (try? await daemon.status())?.upgrades == 1 }
        let after = try await daemon.status()
        #expect(after.pid == before.pid && after.executableSHA256 == good, "the good binary runs")
        #expect(after.processes.first { $0.id == "c" }?.pid == before.processes.first { $0.id == "c" }?.pid, "the same process")
        #expect(daemon.log.contains("SIGHUP during a live upgrade: another reload follows it"), "taken during the check")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// The client that asked for the upgrade (`holdfast upgrade`: dpkg's postinst, systemd's
    /// ExecReload) is killed while the new binary is checked — an interrupted `apt upgrade`, a
    /// reload job that timed out. The upgrade is the daemon's to finish: the new binary runs,
    /// the same pid, the same process, every line once.
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the check waits at a failpoint, which only debug builds have"))
    func anUpgradeWhoseClientIsKilledDuringTheCheckStillHappens() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let (daemon, output, before, sha, upgrade) = try await Self.upgradeBeingChecked(binary)
        defer { daemon.cleanUp() }
        #expect(kill(upgrade, SIGKILL) == 0)
        #expect(try await daemon.processes.wait(upgrade, timeout: .seconds(10)) == .signaled(SIGKILL))

        try await eventually("the upgrade done", timeout: .seconds(60)) { (try? await daemon.status())?.upgrades == 1 }
        let after = try await daemon.status()
        #expect(after.pid == before.pid && after.executableSHA256 == sha, "the same supervisor, the new binary")
        #expect(after.processes.first { $0.id == "counter" }?.pid == before.processes.first { $0.id == "counter" }?.pid, "the same process")
        _ = try await Self.stopCountingEveryLine(daemon, output)
    }

    /// A daemon whose checks of a new binary take 3 s (the failpoint), a counter streaming,
    /// variant 1 at the path and `holdfast upgrade` started: returned once the check runs (the
    /// binary is open by then, so what lands at the path from now on is not the one checked).
    static func upgradeBeingChecked(
        _ binary: InstalledBinary
    ) async throws -> (daemon: DaemonFixture, output: Accumulator, before: StatusReport, checked: String, upgrade: pid_t) {
        let daemon = try await DaemonFixture(
            environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.upgradeCheckSlow):check"], executable: binary.path)
        do {
            let output = try await DaemonSignalTests.startCounter(daemon, id: "counter", token: "counter-out")
            let before = try await daemon.status()
            let checked = try binary.install(variant: 1)
            let upgrade = try startUpgrade(daemon, output: daemon.directory.file("upgrade.out"))
            try await eventually("the new binary's check started", timeout: .seconds(30)) { checkRunning(for: daemon) }
            return (daemon, output, before, checked, upgrade)
        } catch {
            daemon.cleanUp()
            throw error
        }
    }

    /// Stops the daemon once the counter printed more, and checks its every line arrived once, in
    /// order; returns how many.
    static func stopCountingEveryLine(_ daemon: DaemonFixture, _ output: Accumulator) async throws -> Int {
        let atStop = output.count
        try await eventually("output after the upgrades") { output.count > atStop + 100 }
        #expect(try await daemon.stop() == .exited(0))
        let numbers = EveryKindOfStream.numbers(Array(output.text.utf8), prefix: "by")
        #expect(!numbers.isEmpty && numbers == Array(1...numbers.last!), "every line once, in order: \(numbers.count) lines")
        return numbers.count
    }

    /// Whether a process runs this daemon's check of a new binary (`--check-resume-snapshot`
    /// with its configuration file).
    static func checkRunning(for daemon: DaemonFixture) -> Bool {
        (DirectoryListing.names("/proc") ?? []).contains { name in
            guard Int32(name) != nil, let bytes = readFile("/proc/\(name)/cmdline") else { return false }
            let arguments = bytes.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            return arguments.contains("--check-resume-snapshot") && arguments.contains { $0.hasPrefix(daemon.directory.path) }
        }
    }
}
