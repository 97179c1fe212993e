import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A live upgrade whose broker dies as it is asked to quiesce (an OOM kill, an operator's
/// SIGKILL, a crash: any Holdfast process can die at any instant, a package upgrade's included).
/// The upgrade must go on — the supervisor holds every fd and checkpoint, so the new image's
/// broker resumes the streams as after a crash — with nothing lost, nothing repeated, each exit
/// reported once, and the daemon must say the broker did not quiesce cleanly.
@Suite("Live upgrade: the broker killed as it quiesces", .serialized, .timeLimit(.minutes(3)))
struct LiveUpgradeBrokerCrashTests {
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the broker dies at a failpoint, which only debug builds have"))
    func anUpgradeWhoseBrokerDiesAsItQuiescesLosesNothing() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let daemon = try await DaemonFixture(
            environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.brokerQuiescing):broker"], executable: binary.path)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let copy = daemon.directory.file("stdin.copy")
        let output = collect(try daemon.streams.open(token: bytes("q-out"), direction: .receive))
        let input = try daemon.streams.open(token: bytes("q-in"), direction: .send)
        let pid = try await daemon.bridge.create(ProcessSpec(
            id: "q", argv: ["sh", "-c", "exec 3<&0; cat <&3 > \(copy) & exec 3<&-; i=0; while [ $i -lt 3000 ]; do i=$((i+1)); echo line $i; [ $((i % 50)) -ne 0 ] || sleep 0.02; done; wait"],
            stdin: daemon.spec("q-in"), stdout: daemon.spec("q-out")))
        let before = try await daemon.status()
        let brokerBefore = try #require(before.roles.first { $0.name == "broker" }?.pid)
        let typist = NumberedTypist { try await input.send($0) }
        try await Task.sleep(for: .milliseconds(300))
        let sha = try binary.install(variant: 1)
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)\n\(daemon.log.suffix(4000))")
        #expect(daemon.log.contains("the broker did not quiesce cleanly"), "the broker died at the failpoint: \(daemon.log.suffix(3000))")
        #expect(kill(brokerBefore, 0) != 0, "the broker that was asked to quiesce is gone")
        let after = try await daemon.status()
        #expect(after.pid == before.pid, "the same supervisor")
        #expect(after.upgrades == 1)
        #expect(after.executableSHA256 == sha, "the new binary runs")
        #expect(after.processes.first { $0.id == "q" }?.pid == pid, "the process kept across the upgrade")
        try await Task.sleep(for: .milliseconds(300))
        let sent = await typist.stop()
        #expect(await input.finish() == 0)
        try await eventually("the exit at the host", timeout: .seconds(60)) { exits.count("q") == 1 }
        let report = try #require(exits.all.first { $0.id == "q" })
        #expect(report.exitCode == 0 && report.lost == nil && report.inputRepeated == nil, "\(report)")
        #expect(await output.value == expectedLines(3000), "every output byte once, in order")
        try await eventually("cat's copy complete", timeout: .seconds(20)) { (readFile(copy) ?? []).count >= sent.count }
        #expect(readFile(copy) == sent, "stdin exact: \(sent.count) bytes")
        #expect(exits.count("q") == 1, "the exit reported once")
        let lines = daemon.log.split(separator: "\n").filter { $0.contains("quiesce") || $0.contains("resumed from its checkpoint") }
        print("an upgrade whose broker died as it quiesced:\n\(lines.joined(separator: "\n"))")
        #expect(try await daemon.stop() == .exited(0))
    }
}
