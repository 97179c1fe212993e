import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A container that eats the guest's memory makes the OOM killer choose a victim by badness
/// (mostly resident memory). In a small utility VM the supervisor (about 40 MiB) can be the
/// largest process, and its death ends every container; the broker and the bridge worker
/// survive their own. So the supervisor is never chosen (-1000), the roles are spared before a
/// container (-500), and every container gets back the adjustment the daemon was started with
/// — children inherit it, and a container must stay the first choice.
@Suite("The OOM killer chooses a container before Holdfast")
struct OOMScoreTests {
    static func adjustment(_ pid: pid_t) -> Int32? {
        readFile("/proc/\(pid)/oom_score_adj").flatMap { Int32(String(decoding: $0, as: UTF8.self).filter { $0 != " " && $0 != "\n" }) }
    }

    /// Whether this process may lower an OOM score adjustment (CAP_SYS_RESOURCE, bit 24 of
    /// CapEff): root in a VM may; root in a container (this machine, CI) may not.
    static var canLower: Bool {
        guard let status = readFile("/proc/self/status").map({ String(decoding: $0, as: UTF8.self) }),
            let line = status.split(separator: "\n").first(where: { $0.hasPrefix("CapEff:") }),
            let mask = UInt64(line.dropFirst("CapEff:".count).filter { $0 != " " && $0 != "\t" }, radix: 16)
        else { return false }
        return mask & (1 << 24) != 0
    }

    /// The daemon is started with an adjustment of 300, as a unit's `OOMScoreAdjust=300` would
    /// (raising needs no privilege). Where it may, it protects the supervisor (-1000) and the
    /// roles (-500); where the kernel refuses (no CAP_SYS_RESOURCE) it says so and everything
    /// keeps 300. Either way, every container gets 300 back — also after a broker restart and
    /// a live upgrade, whose new image must not hand its own -1000 on.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func theSupervisorIsNeverChosenTheRolesAreSparedAndContainersKeepTheirs() async throws {
        let given: Int32 = 300
        let daemon = try await DaemonFixture(oomScoreAdjustment: given)
        defer { daemon.cleanUp() }
        let (supervisor, role) = Self.canLower ? (OOMScore.supervisor, OOMScore.role) : (given, given)
        func expectRoles() async throws {
            #expect(Self.adjustment(daemon.daemonPID) == supervisor, "the supervisor")
            for name in ["broker", "bridge"] {
                #expect(Self.adjustment(try #require(try await daemon.rolePID(name))) == role, "the \(name)")
            }
        }
        try await expectRoles()
        if Self.canLower {
            #expect(readFile("/proc/\(daemon.daemonPID)/oom_score").map { String(decoding: $0, as: UTF8.self) } == "0\n", "a badness of 0: never chosen")
        } else {
            try await daemon.waitForLog("cannot protect the supervisor from the OOM killer (it needs CAP_SYS_RESOURCE)")
            print("no CAP_SYS_RESOURCE here: the daemon said so, and only the containers' part was checked")
        }
        let container = try await daemon.launch(ProcessSpec(id: "c", argv: ["sleep", "60"]))
        #expect(Self.adjustment(container) == given, "a container gets back what the daemon was started with")

        let broker = try #require(try await daemon.rolePID("broker"))

        let killedBroker = ProcessIdentity(broker)
        kill(broker, SIGKILL)
        try await eventually("the next broker") { try await daemon.roleIsAnother("broker", than: killedBroker) }
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        try await expectRoles()
        let after = try await daemon.launch(ProcessSpec(id: "after-upgrade", argv: ["sleep", "60"]))
        #expect(Self.adjustment(after) == given, "a container started after a broker restart and an upgrade")
        #expect(try await daemon.stop() == .exited(0))
    }
}
