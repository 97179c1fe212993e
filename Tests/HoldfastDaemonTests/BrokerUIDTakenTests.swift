import Foundation
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A container process that takes the broker's uid: root in a runc container with CAP_SETUID
/// (Docker's default capabilities have it) runs `setpriv --reuid=UID` (util-linux's, from the
/// guest's /usr). The daemon starts the
/// broker only while no process runs as its uid, because one that can see it could signal it or,
/// in the moment after its exec before it makes itself undumpable, trace it.
@Suite("A container that takes the broker's uid", .serialized, .timeLimit(.minutes(3)))
struct BrokerUIDTakenTests {
    static let enabled = DaemonFixture.canRun && TestBundle.canRun

    /// In a pid namespace of its own (runc's default) the taker cannot see the broker at all:
    /// no signal, no trace, no pidfd reaches it. Before, it still counted as a sharer: once the
    /// broker died (a crash, the OOM killer) no broker was started again for as long as the
    /// taker lived — every stream stopped — and a live upgrade's new broker the same.
    @Test(.enabled(if: enabled, "needs root, runc and busybox-static"))
    func aTakerThatCannotSeeTheBrokerDoesNotKeepItFromRestarting() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let output = try await Self.startCounter(daemon)
        let broker = try #require(try await daemon.rolePID("broker"))
        let taker = try await Self.takeTheBrokersUID(daemon, id: "taker-own-ns", hostPIDNamespace: false)
        defer { taker.end() }

        #expect(kill(broker, SIGKILL) == 0)  // a crash
        try await eventually("a new broker", timeout: .seconds(20)) {
            (try await daemon.rolePID("broker")).map { $0 != broker } ?? false
        }
        #expect(taker.process.isAlive, "the taker runs on: it was let be")
        #expect(try await withTimeout("the counter's output", .seconds(60)) { await output.value } == expectedLines(400), "every line once across the crash")
        // The log says why it was let be (waited for: its line reaches the file through the
        // log's writer thread).
        try await daemon.waitForLog("in another pid namespace")

        // A live upgrade starts a broker too.
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        try await eventually("the new image's broker") { (try await daemon.rolePID("broker")) != nil }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// The same container (a child of the supervisor, as every runc init is) refuses a live
    /// upgrade before anything stops, naming it: only the running broker itself is not
    /// counted (its pid in the upgrade's state). The counter runs on, whole.
    @Test(.enabled(if: enabled, "needs root, runc and busybox-static"))
    func aTakerThatSeesTheBrokerRefusesALiveUpgradeBeforeAnythingStops() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let output = try await Self.startCounter(daemon)
        let broker = try #require(try await daemon.rolePID("broker"))
        let taker = try await Self.takeTheBrokersUID(daemon, id: "taker-upgrade", hostPIDNamespace: true)
        defer { taker.end() }
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(1), "\(upgrade.output)")
        #expect(upgrade.output.contains("pid \(taker.process.pid)"), "names the taker: \(upgrade.output)")
        #expect(try await daemon.rolePID("broker") == broker, "the same broker serves on")
        #expect(try await daemon.status().upgrades == 0)
        #expect(try await withTimeout("the counter's output", .seconds(60)) { await output.value } == expectedLines(400))
        try await daemon.bridge.signal("taker-upgrade", SIGKILL)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// In the guest's pid namespace (`--pid=host`) it can see the broker: the restart waits for
    /// it to be gone, as before; then the broker comes back and the counter's output is whole.
    @Test(.enabled(if: enabled, "needs root, runc and busybox-static"))
    func aTakerThatSeesTheBrokerHoldsItsRestartUntilItIsGone() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let output = try await Self.startCounter(daemon)
        let broker = try #require(try await daemon.rolePID("broker"))
        let taker = try await Self.takeTheBrokersUID(daemon, id: "taker-host-ns", hostPIDNamespace: true)
        defer { taker.end() }

        #expect(kill(broker, SIGKILL) == 0)
        try await daemon.waitForLog("could signal the broker")
        #expect(try await daemon.rolePID("broker") == nil, "not started while the taker can see it")
        // `status` says why, not "being restarted".
        let said = try await daemon.status().roles.first { $0.name == "broker" }?.notAnswering ?? ""
        #expect(said.hasPrefix("not running: cannot be started") && said.contains("pid \(taker.process.pid)"), "\(said)")
        try await daemon.bridge.signal("taker-host-ns", SIGKILL)
        try await eventually("the taker gone") { !taker.process.isAlive }
        try await eventually("a new broker", timeout: .seconds(20)) { (try await daemon.rolePID("broker")) != nil }
        #expect(try await withTimeout("the counter's output", .seconds(60)) { await output.value } == expectedLines(400))
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A container process that took the broker's uid, ended by pid (and its cgroups removed)
    /// whatever the test's outcome: a daemon the fixture kills leaves its runc containers.
    struct Taker {
        /// Its bundle's `cgroupsPath`: the cgroup runc made for it, under each hierarchy.
        let cgroupsPath: String
        let process: ProcessIdentity
        let pinned: PinnedProcess

        func end() {
            if process.isAlive {
                pinned.signal(SIGKILL)
                let deadline = ContinuousClock.now + .seconds(5)
                while process.isAlive && ContinuousClock.now < deadline { usleep(10_000) }
            }
            let hierarchies = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/fs/cgroup")) ?? []
            for cgroup in ["/sys/fs/cgroup" + cgroupsPath] + hierarchies.map({ "/sys/fs/cgroup/\($0)" + cgroupsPath }) { rmdir(cgroup) }
        }
    }

    /// A counter of 400 lines over the bridge (about 4 s); what the host receives of it.
    static func startCounter(_ daemon: DaemonFixture) async throws -> Task<[UInt8], Never> {
        let output = collect(try daemon.streams.open(token: bytes("counter-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(id: "counter", argv: counterCommand(400, pause: "0.01"), stdout: daemon.spec("counter-out")))
        return output
    }

    /// Starts a runc container, root with CAP_SETUID and CAP_SETGID, whose process becomes the
    /// broker's uid; returns it once it has.
    static func takeTheBrokersUID(_ daemon: DaemonFixture, id: String, hostPIDNamespace: Bool) async throws -> Taker {
        let uid = daemon.brokerUID
        let bundle = try TestBundle(
            in: daemon.directory, name: "bundle-\(id)",
            args: ["/usr/bin/setpriv", "--reuid=\(uid)", "--regid=\(uid)", "--clear-groups", "/bin/sleep", "1000"], terminal: false,
            hostPIDNamespace: hostPIDNamespace)
        try bundle.addCapabilitiesAndTheGuestsUsr(["CAP_SETUID", "CAP_SETGID"])
        let pid = try await daemon.bridge.create(ProcessSpec(id: id, argv: [], runtime: .runc, bundle: bundle.path))
        let taker = Taker(cgroupsPath: bundle.cgroupsPath, process: try #require(ProcessIdentity(pid)), pinned: try #require(PinnedProcess(pid)))
        try await eventually("the container's process under the broker's uid") { ProcessScan.uids(of: pid)?.first == uid }
        return taker
    }
}
