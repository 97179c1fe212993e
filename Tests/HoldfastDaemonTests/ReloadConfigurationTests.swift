import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A reload (a live upgrade onto the same binary) that reads a changed configuration file: a
/// change the new image could not live with is refused before anything stops, and one that
/// would strand what runs now keeps its running value until the next start.
@Suite("Reload: a changed configuration never strands what runs", .serialized, .timeLimit(.minutes(4)))
struct ReloadConfigurationTests {
    /// `broker.user` changed to a uid a process already runs as. Before, the check passed, the
    /// old broker quiesced and exited, and the new image refused every start of its broker (the
    /// uid is not its own): every stream stopped, every create failed after 15 s, and `holdfast
    /// upgrade` timed out. Now the new binary's check refuses it, naming the process, and the
    /// daemon runs on with its broker; once that process is gone, the same reload goes through
    /// and the new broker runs as the new uid.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func aBrokerUserChangedToAUIDAProcessUsesIsRefusedBeforeAnythingStops() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        var sharedUID = ReservedUIDs.unused()
        while sharedUID == daemon.brokerUID { sharedUID = ReservedUIDs.unused() }
        let sharer = try daemon.processes.start(["/bin/sleep", "1000"], user: sharedUID)
        let configPath = daemon.directory.file("holdfast.yaml")
        let config = String(decoding: readFile(configPath) ?? [], as: UTF8.self)
        let changed = config.replacingOccurrences(of: "user: \"uid:\(daemon.brokerUID)\"", with: "user: \"uid:\(sharedUID)\"")
        #expect(changed != config)
        try writeFile(configPath, bytes(changed))
        let broker = try #require(try await daemon.rolePID("broker"))

        let refused = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(refused.status == .exited(1), "\(refused.output)")
        #expect(refused.output.contains("is not the broker's own") && refused.output.contains("pid \(sharer)"), "says why: \(refused.output)")
        #expect(try await daemon.rolePID("broker") == broker, "the same broker serves on")
        #expect(try await daemon.status().upgrades == 0)
        let output = try daemon.streams.open(token: bytes("after-out"), direction: .receive)
        let received = accumulate(output)
        _ = try await daemon.bridge.create(ProcessSpec(id: "after", argv: ["echo", "relayed"], stdout: daemon.spec("after-out")))
        try await eventually("the output of a create after the refusal") { received.count >= 8 }
        #expect(received.bytes == bytes("relayed\n"))

        // The process gone, the same reload goes through: the new broker runs as the new uid.
        daemon.processes.kill(sharer)
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        var newBroker: pid_t?
        try await eventually("the new image's broker") {
            newBroker = try await daemon.rolePID("broker")
            return newBroker.map { $0 != broker } ?? false
        }
        #expect(newBroker.flatMap(Self.realUID) == sharedUID)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A process that took the broker's (unchanged) uid while the broker ran — a `--pid=host`
    /// container's root with `setpriv --reuid`, an operator's `sudo -u` — refuses a live upgrade
    /// before anything stops, naming it; the running broker is not counted. Before, only a
    /// changed uid was checked: the old broker quiesced, every start of the new one was refused,
    /// and every stream stopped.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func aProcessThatTookTheBrokersUIDRefusesAnUpgradeBeforeAnythingStops() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let broker = try #require(try await daemon.rolePID("broker"))
        let sharer = try daemon.processes.start(["/bin/sleep", "1000"], user: daemon.brokerUID)
        let refused = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(refused.status == .exited(1), "\(refused.output)")
        #expect(refused.output.contains("is not the broker's own") && refused.output.contains("pid \(sharer)"), "says why: \(refused.output)")
        #expect(!refused.output.contains("pid \(broker)"), "the running broker is not counted: \(refused.output)")
        #expect(try await daemon.rolePID("broker") == broker, "the same broker serves on")
        #expect(try await daemon.status().upgrades == 0)
        // The process gone, the upgrade goes through (the running broker itself never counted).
        daemon.processes.kill(sharer)
        try await eventually("the sharer gone") { ProcessScan.uids(of: sharer) == nil }
        let upgraded = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgraded.status == .exited(0), "\(upgraded.output)")
        #expect(try await daemon.status().upgrades == 1)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// `handoff.mode` widened before a reload (a runtime in the socket's group is to be let
    /// in): the socket is passed across the exec, not bound again, and kept its old mode — the
    /// runtime got EACCES, nothing said. The new image sets the configured mode.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func aChangedHandoffModeTakesEffectAtAReload() async throws {
        let daemon = try await DaemonFixture(extraConfig: "handoff:\n  mode: \"0600\"")
        defer { daemon.cleanUp() }
        let socket = daemon.directory.file("broker.sock")
        func mode() -> mode_t {
            var info = stat()
            return stat(socket, &info) == 0 ? info.st_mode & 0o777 : 0
        }
        #expect(mode() == 0o600)
        let configPath = daemon.directory.file("holdfast.yaml")
        let config = String(decoding: readFile(configPath) ?? [], as: UTF8.self)
        let changed = config.replacingOccurrences(of: "mode: \"0600\"", with: "mode: \"0660\"")
        #expect(changed != config)
        try writeFile(configPath, bytes(changed))
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        #expect(mode() == 0o660, "the configured mode, after the reload")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// `metrics.address` removed from the configuration before a reload. Its listener is passed
    /// across the exec; before, the new image, configured with no endpoint, neither served nor
    /// closed it: scrapes waited in its backlog for ever. It keeps its running value until the
    /// next start now (logged), like the other sockets.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func aRemovedMetricsAddressKeepsItsEndpointAcrossAReload() async throws {
        let daemon = try await DaemonFixture(extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"")
        defer { daemon.cleanUp() }
        let configPath = daemon.directory.file("holdfast.yaml")
        let config = String(decoding: readFile(configPath) ?? [], as: UTF8.self)
        let changed = config.replacingOccurrences(of: "metrics:\n  address: \"unix:{run}/metrics.sock\"", with: "")
        #expect(changed != config)
        try writeFile(configPath, bytes(changed))

        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        let metrics = try await withDeadline("a scrape after the reload", .seconds(20)) {
            try await httpExchange(.unix(path: daemon.directory.file("metrics.sock")), "GET /metrics HTTP/1.0\r\n\r\n")
        }
        #expect(metrics.hasPrefix("HTTP/1.") && metrics.contains("holdfast_"), "served on: \(metrics.prefix(200))")
        try await daemon.waitForLog("metrics.address changed: it takes effect at the next start")
        // Said where the operator looks, not only in the log: `holdfast upgrade` and `status`.
        let said = "metrics.address: configured \"\", running unix:\(daemon.directory.file("metrics.sock")) until the next start"
        #expect(upgrade.output.contains(said), "\(upgrade.output)")
        let pending = try await daemon.status().settingsAwaitingRestart
        #expect(pending == [StatusReport.PendingSetting(key: "metrics.address", running: "unix:\(daemon.directory.file("metrics.sock"))", configured: "\"\"")])
        #expect(try await daemon.stop() == .exited(0))
    }

    /// `run_directory` moved (`runc.root` follows it through the default "{run}/runc"), or
    /// `runc.root` itself, while a runc container runs. Before, the new image called runc with
    /// the new root: the container "does not exist" — the host could not exec into it or stop
    /// it, and its state was never deleted. Now `runc.root` keeps its running value until the
    /// next start (logged), like `run_directory`.
    @Test(.enabled(if: DaemonFixture.canRun && TestBundle.canRun, "needs root, runc and busybox-static"))
    func aMovedRuncRootKeepsItsRunningValueAcrossAReload() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let bundle = try TestBundle(in: daemon.directory, name: "sleeper", args: ["sleep", "600"], terminal: false)
        _ = try await daemon.bridge.create(ProcessSpec(id: "box", argv: [], runtime: .runc, bundle: bundle.path))
        let configPath = daemon.directory.file("holdfast.yaml")
        let config = String(decoding: readFile(configPath) ?? [], as: UTF8.self)
        try writeFile(configPath, bytes(config + "\nrunc:\n  root: \"{run}/runc-moved\"\n"))

        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        try await daemon.waitForLog("runc.root changed: it takes effect at the next start")
        let execOut = collect(try daemon.streams.open(token: bytes("x-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(id: "box.x", argv: ["echo", "inside"], stdout: daemon.spec("x-out"), runtime: .runc, container: "box"))
        #expect(await execOut.value == bytes("inside\n"), "an exec into the container after the reload")
        try await daemon.bridge.signal("box", SIGKILL)
        try await eventually("the container's exit", timeout: .seconds(20)) { exits.count("box") == 1 }
        #expect(exits.all.first { $0.id == "box" }?.exitCode == 128 + SIGKILL)
        try await eventually("runc delete") {
            try commandOutput(["runc", "--root", daemon.directory.file("runc"), "list", "-q"], in: daemon.directory).isEmpty
        }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// The real uid of `pid` (the first field of /proc/PID/status's `Uid:` line).
    static func realUID(_ pid: pid_t) -> uid_t? {
        let status = String(decoding: readFile("/proc/\(pid)/status") ?? [], as: UTF8.self)
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Uid:") }) else { return nil }
        return line.split(whereSeparator: { $0 == " " || $0 == "\t" }).dropFirst().first.flatMap { uid_t($0) }
    }
}
