import Foundation
import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Any process the kernel's OOM killer ends — a direct one too, which has no memory cgroup of
/// the daemon's — is reported so (`ExitReport.oomKilled`), from the kernel's own log; a SIGKILL
/// from anyone else, or a process forging the kernel's record, is not.
@Suite("OOM kills of any process, from the kernel's log", .timeLimit(.minutes(3)))
struct OOMKillTests {
    static var canRun: Bool {
        DaemonFixture.canRun && TestBundle.canRun && MemoryLimitedCgroup.available && access("/dev/kmsg", R_OK) == 0
    }

    /// A shell that moves itself into `cgroup`, says so, and becomes an awk doubling a string
    /// until the OOM killer ends it.
    static func hog(into cgroup: MemoryLimitedCgroup) -> [String] {
        ["/bin/sh", "-c", "echo $$ > \(cgroup.procs) && echo moved && exec /bin/busybox awk 'BEGIN { s = \"0123456789abcdef\"; while (1) s = s s }'"]
    }

    @Test(.enabled(if: canRun, "needs root, busybox-static, a memory cgroup hierarchy and /dev/kmsg"))
    func aDirectProcessKilledByTheOOMKillerSaysSoAndOtherSIGKILLsDoNot() async throws {
        let daemon = try await DaemonFixture(extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"")
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let cgroup = try #require(MemoryLimitedCgroup.make(name: "holdfast-test-oom-\(UInt32.random(in: 0..<UInt32.max))", limit: 32 << 20))
        defer { cgroup.remove() }

        let hogOut = collect(try daemon.streams.open(token: bytes("hog-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(id: "hog", argv: Self.hog(into: cgroup), stdout: daemon.spec("hog-out")))
        try await eventually("the hog's exit", timeout: .seconds(60)) { exits.count("hog") == 1 }
        #expect(try await withTimeout("the hog's stdout", .seconds(30)) { await hogOut.value } == bytes("moved\n"))
        let hog = try #require(exits.all.first { $0.id == "hog" })
        #expect(hog.signal == SIGKILL && hog.exitCode == 128 + SIGKILL)
        #expect(hog.oomKilled == true && hog.wasLikelyOOMKilled, "\(hog)")
        #expect(hog.oomKills == nil, "a direct process has no container count")

        // A SIGKILL from the host: read from the same log, not the OOM killer's.
        let sleeperOut = Accumulator(try daemon.streams.open(token: bytes("sl-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(id: "sleeper", argv: ["/bin/sh", "-c", "echo up; exec sleep 60"], stdout: daemon.spec("sl-out")))
        try await eventually("the sleeper up", timeout: .seconds(30)) { sleeperOut.text == "up\n" }
        try await daemon.bridge.signal("sleeper", SIGKILL)
        try await eventually("the sleeper's exit", timeout: .seconds(30)) { exits.count("sleeper") == 1 }
        let sleeper = try #require(exits.all.first { $0.id == "sleeper" })
        #expect(sleeper.signal == SIGKILL && sleeper.oomKilled == false && !sleeper.wasLikelyOOMKilled, "\(sleeper)")

        // A process that writes the OOM killer's record about itself into the kernel's log, as
        // the kernel's (priority 0 and 3), then is killed by the host: the kernel gave the
        // forgeries the user facility, so they do not count.
        let forgerOut = Accumulator(try daemon.streams.open(token: bytes("fo-out"), direction: .receive))
        let forge = "for p in 0 3; do echo \"<$p>Out of memory: Killed process $$ (sh) total-vm:1kB\" > /dev/kmsg; done; echo forged; exec sleep 60"
        _ = try await daemon.bridge.create(ProcessSpec(id: "forger", argv: ["/bin/sh", "-c", forge], stdout: daemon.spec("fo-out")))
        try await eventually("the forgeries written", timeout: .seconds(30)) { forgerOut.text == "forged\n" }
        try await daemon.bridge.signal("forger", SIGKILL)
        try await eventually("the forger's exit", timeout: .seconds(30)) { exits.count("forger") == 1 }
        let forger = try #require(exits.all.first { $0.id == "forger" })
        #expect(forger.signal == SIGKILL && forger.oomKilled == false && !forger.wasLikelyOOMKilled, "\(forger)")

        // An exit that is not a SIGKILL says nothing of the OOM killer.
        _ = try await daemon.bridge.create(ProcessSpec(id: "clean", argv: ["/bin/sh", "-c", "exit 3"]))
        try await eventually("the clean exit", timeout: .seconds(30)) { exits.count("clean") == 1 }
        let clean = try #require(exits.all.first { $0.id == "clean" })
        #expect(clean.exitCode == 3 && clean.oomKilled == nil && !clean.wasLikelyOOMKilled)

        let metrics = parsePrometheus(
            try await httpExchange(.unix(path: daemon.directory.file("metrics.sock")), "GET /metrics HTTP/1.1\r\nHost: guest\r\n\r\n"))
        #expect(metrics["holdfast_processes_oom_killed_total"] == 1)
        #expect(try await daemon.stop() == .exited(0))
        #expect(daemon.log.contains("process killed by the OOM killer"))
    }

    /// From the host's command line: `host run` says the OOM killer killed it and exits 137;
    /// `host ps -a` marks it.
    @Test(.enabled(if: canRun, "needs root, busybox-static, a memory cgroup hierarchy and /dev/kmsg"))
    func hostRunAndPSSayTheOOMKillerDidIt() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let cgroup = try #require(MemoryLimitedCgroup.make(name: "holdfast-test-oom-\(UInt32.random(in: 0..<UInt32.max))", limit: 32 << 20))
        defer { cgroup.remove() }
        let run = try await serve.cli(["run", "--id", "eater", "--"] + Self.hog(into: cgroup))
        #expect(run.status == .exited(128 + SIGKILL), "\(run.err)")
        #expect(run.out == "moved\n")
        #expect(run.err.contains("killed by the guest kernel's OOM killer"), "\(run.err)")
        let all = try await serve.cli(["ps", "-a"])
        let line = all.out.split(separator: "\n").first { $0.hasPrefix("eater") }.map(String.init) ?? ""
        #expect(line.contains("exited") && line.contains("137 (OOM killed)"), "\(all.out)")
        // A SIGKILL from the host is not marked.
        _ = try await serve.cli(["run", "-d", "--id", "napper", "--", "sleep", "1000"])
        _ = try await serve.cli(["kill", "napper", "KILL"])
        #expect(try await serve.cli(["wait", "napper"]).out == "137\n")
        let after = try await serve.cli(["ps", "-a"])
        let napper = after.out.split(separator: "\n").first { $0.hasPrefix("napper") }.map(String.init) ?? ""
        #expect(napper.contains("137") && !napper.contains("OOM"), "\(after.out)")
    }

    /// A process killed by the OOM killer while a live upgrade's exec waits (the earlier image
    /// has handed its state over and reaps nothing more; the kernel logs the kill meanwhile): the
    /// next image reads the log on from where the earlier one stopped, and reports it. Opened
    /// afresh at its end, as before, the record was never read: `false`.
    @Test(
        .enabled(if: canRun, "needs root, busybox-static, a memory cgroup hierarchy and /dev/kmsg"),
        .enabled(if: Failpoint.compiledIn, "the exec waits at a failpoint, which only debug builds have"))
    func aProcessKilledWhileALiveUpgradeExecsIsStillToldOOMKilled() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.upgradeExecLate):supervisor"])
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let cgroup = try #require(MemoryLimitedCgroup.make(name: "holdfast-test-oom-\(UInt32.random(in: 0..<UInt32.max))", limit: 32 << 20))
        defer { cgroup.remove() }
        let go = daemon.directory.file("go")
        let ate = daemon.directory.file("ate")
        var argv = Self.hog(into: cgroup)
        argv[2] = "while [ ! -e \(go) ]; do sleep 0.02; done; touch \(ate); " + argv[2]
        _ = try await daemon.bridge.create(ProcessSpec(id: "during", argv: argv))
        let upgradeOutput = daemon.directory.file("upgrade.out")
        let upgrade = try startUpgrade(daemon, output: upgradeOutput)
        try await daemon.waitForLog("live upgrade: executing the new binary", timeout: .seconds(60))
        try writeFile(go, [])
        try await eventually("the hog eating, the exec still held (3 s)", timeout: .seconds(2)) { access(ate, F_OK) == 0 }
        let status = try await daemon.processes.wait(upgrade, timeout: .seconds(60))
        #expect(status == .exited(0), "\(String(decoding: readFile(upgradeOutput) ?? [], as: UTF8.self))")
        try await eventually("the hog's exit", timeout: .seconds(60)) { exits.count("during") == 1 }
        let during = try #require(exits.all.first { $0.id == "during" })
        #expect(during.signal == SIGKILL && during.oomKilled == true, "\(during)")
        #expect(try await daemon.status().upgrades == 1)
        #expect(try await daemon.stop() == .exited(0))
    }
}
