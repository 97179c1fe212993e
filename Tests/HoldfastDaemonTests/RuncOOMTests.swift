import Foundation
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A runc container's process killed by the kernel's OOM killer is reported so: its exit says
/// how many OOM kills its memory cgroup counted while it ran (`ExitReport.oomKills`), which a
/// SIGKILL from anyone else never shows. A container that runs out of memory in its own cgroup
/// touches nothing else: another container's stream stays exact, the daemon serves on.
@Suite("runc: OOM kills reported in the exit", .timeLimit(.minutes(3)))
struct RuncOOMTests {
    /// Doubles a string until the container's memory limit stops it (busybox awk).
    static let hog = ["awk", "BEGIN { s = \"0123456789abcdef\"; while (1) s = s s }"]
    static let limit = 32 << 20

    /// A bundle whose container may use `limit` bytes of memory, swap included (so a guest with
    /// swap kills it too, rather than let it swap).
    func limitedBundle(in directory: TemporaryDirectory, name: String, args: [String]) throws -> TestBundle {
        let bundle = try TestBundle(in: directory, name: name, args: args, terminal: false)
        #expect(symlink("busybox", bundle.path + "/rootfs/bin/awk") == 0)
        let configPath = bundle.path + "/config.json"
        let written = try #require(readFile(configPath))
        var config = try #require(try JSONSerialization.jsonObject(with: Data(written)) as? [String: Any])
        var linux = try #require(config["linux"] as? [String: Any])
        var resources = (linux["resources"] as? [String: Any]) ?? [:]
        resources["memory"] = ["limit": Self.limit, "swap": Self.limit]
        linux["resources"] = resources
        config["linux"] = linux
        try writeFile(configPath, Array(try JSONSerialization.data(withJSONObject: config)))
        return bundle
    }

    @Test(.enabled(if: OOMKillTests.canRun, "needs root, runc, busybox-static, a memory cgroup hierarchy and /dev/kmsg"))
    func aContainerKilledByTheOOMKillerSaysSoAndNothingElseIsTouched() async throws {
        let daemon = try await DaemonFixture(extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"")
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        // A bystander streaming all along, in a container of its own.
        let bystander = try TestBundle(
            in: daemon.directory, name: "bystander",
            args: ["sh", "-c", "i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo line $i; sleep 0.01; done"], terminal: false)
        let bystanderOut = collect(try daemon.streams.open(token: bytes("by-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "bystander", argv: [], stdout: daemon.spec("by-out"), runtime: .runc, bundle: bystander.path))

        // The init itself runs out of memory.
        let hogBundle = try limitedBundle(in: daemon.directory, name: "hog", args: ["sh", "-c", "echo start; exec " + Self.hogShell])
        let hogOut = collect(try daemon.streams.open(token: bytes("hog-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "hog", argv: [], stdout: daemon.spec("hog-out"), runtime: .runc, bundle: hogBundle.path))
        try await eventually("the hog's exit", timeout: .seconds(60)) { exits.count("hog") == 1 }
        #expect(try await withTimeout("the hog's stdout", .seconds(30)) { await hogOut.value } == bytes("start\n"))
        let hog = try #require(exits.all.first { $0.id == "hog" })
        #expect(hog.signal == SIGKILL && hog.exitCode == 128 + SIGKILL)
        #expect((hog.oomKills ?? 0) >= 1, "the OOM kill counted: \(hog)")
        #expect(hog.wasLikelyOOMKilled)

        // An exec runs out of memory in a container whose init lives on; one started after it
        // counts only its own life's kills (none); the init, killed by the host, counts the exec's.
        let boxBundle = try limitedBundle(in: daemon.directory, name: "box", args: ["sleep", "60"])
        _ = try await daemon.bridge.create(ProcessSpec(id: "box", argv: [], runtime: .runc, bundle: boxBundle.path))
        _ = try await daemon.bridge.create(ProcessSpec(id: "box.hog", argv: Self.hog, runtime: .runc, container: "box"))
        try await eventually("the exec's exit", timeout: .seconds(60)) { exits.count("box.hog") == 1 }
        let execHog = try #require(exits.all.first { $0.id == "box.hog" })
        #expect(execHog.signal == SIGKILL && (execHog.oomKills ?? 0) >= 1 && execHog.wasLikelyOOMKilled, "\(execHog)")
        _ = try await daemon.bridge.create(ProcessSpec(id: "box.after", argv: ["true"], runtime: .runc, container: "box"))
        try await eventually("the later exec's exit", timeout: .seconds(30)) { exits.count("box.after") == 1 }
        let after = try #require(exits.all.first { $0.id == "box.after" })
        #expect(after.exitCode == 0 && after.oomKills == nil, "\(after)")
        // `status` shows the running container's count so far.
        let boxStatus = try #require(try await daemon.status().processes.first { $0.id == "box" })
        #expect(boxStatus.state == .running && (boxStatus.oomKills ?? 0) >= 1, "\(boxStatus)")
        try await daemon.bridge.signal("box", SIGKILL)
        try await eventually("the box's exit", timeout: .seconds(30)) { exits.count("box") == 1 }
        let box = try #require(exits.all.first { $0.id == "box" })
        #expect(box.signal == SIGKILL && (box.oomKills ?? 0) >= 1, "the exec's kill was in the container's life: \(box)")
        // The kernel's log tells the host's SIGKILL from the OOM killer's, which the count cannot.
        #expect(box.oomKilled == false && !box.wasLikelyOOMKilled, "\(box)")
        #expect(hog.oomKilled == true && execHog.oomKilled == true)

        // Nothing else touched: the bystander's every line, its exit clean and not an OOM kill.
        try await eventually("the bystander's exit", timeout: .seconds(60)) { exits.count("bystander") == 1 }
        let lines = try await withTimeout("the bystander's stdout", .seconds(30)) { await bystanderOut.value }
        #expect(sha256Hex(lines) == sha256Hex(expectedLines(300)))
        let clean = try #require(exits.all.first { $0.id == "bystander" })
        #expect(clean.exitCode == 0 && clean.oomKills == nil && !clean.wasLikelyOOMKilled)

        let metrics = parsePrometheus(
            try await httpExchange(.unix(path: daemon.directory.file("metrics.sock")), "GET /metrics HTTP/1.1\r\nHost: guest\r\n\r\n"))
        // Counted once, at each container's end (the exec's kill is part of its container's count).
        let counted = (hog.oomKills ?? 0) + (box.oomKills ?? 0)
        #expect(metrics["holdfast_container_oom_kills_total"] == Double(counted))
        #expect(metrics["holdfast_processes_oom_killed_total"] == 2, "the hog and the exec")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// `hog` as a shell command.
    static var hogShell: String { "awk 'BEGIN { s = \"0123456789abcdef\"; while (1) s = s s }'" }
}
