import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// An operator renices the daemon (`renice -n 10 -p PID`) or changes its scheduling policy
/// (`chrt -b -p 0 PID`, or a real-time one to keep its watchdog fed): that changes the thread
/// the daemon forks from, and before, every container process (and a restarted broker) started
/// after it inherited it. Now each is given the scheduling the daemon started with.
@Suite("Scheduling the daemon was given later is not its children's", .serialized, .timeLimit(.minutes(2)))
struct SchedulingInheritanceTests {
    /// Linux's SCHED_BATCH (sched.h defines it only under _GNU_SOURCE, which Swift's Glibc lacks);
    /// SCHED_OTHER is 0.
    static let schedBatch: Int32 = 3

    /// Field `number` (1-based, as proc(5) counts) of /proc/PID/stat.
    static func statField(_ pid: pid_t, _ number: Int) -> Int? {
        let stat = String(decoding: readFile("/proc/\(pid)/stat") ?? [], as: UTF8.self)
        guard let close = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.indices.contains(number - 3) ? Int(fields[number - 3]) : nil
    }

    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func aReniceOrPolicyOfTheDaemonDoesNotReachWhatItStarts() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let startNice = try #require(Self.statField(daemon.daemonPID, 19))
        #expect(setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(daemon.daemonPID), Int32(startNice + 10)) == 0)
        var parameters = sched_param()
        #expect(sched_setscheduler(daemon.daemonPID, Self.schedBatch, &parameters) == 0)
        #expect(Self.statField(daemon.daemonPID, 19) == startNice + 10 && Self.statField(daemon.daemonPID, 41) == Int(Self.schedBatch))

        let output = accumulate(try daemon.streams.open(token: bytes("s-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(id: "s", argv: ["sh", "-c", "cat /proc/self/stat"], stdout: daemon.spec("s-out")))
        try await eventually("its exit") { exits.count("s") == 1 }
        try await eventually("its line") { output.bytes.last == UInt8(ascii: "\n") }
        let line = String(decoding: output.bytes, as: UTF8.self)
        let fields = line[line.index(after: try #require(line.lastIndex(of: ")")))...].split(separator: " ")
        #expect(Int(fields[19 - 3]) == startNice, "the nice value the daemon started with: \(line)")
        #expect(Int(fields[41 - 3]) == 0, "the policy it started with: \(line)")

        // A broker restarted after it, the same.
        let broker = try #require(try await daemon.rolePID("broker"))
        #expect(kill(broker, SIGKILL) == 0)
        var next: pid_t?
        try await eventually("a new broker", timeout: .seconds(20)) {
            next = try await daemon.rolePID("broker")
            return next.map { $0 != broker } ?? false
        }
        #expect(next.flatMap { Self.statField($0, 19) } == startNice)
        #expect(next.flatMap { Self.statField($0, 41) } == 0)

        // A live upgrade (a reload): the new image is exec'd by the reniced thread, and its own
        // start values would be the operator's; it takes the first image's from the state.
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        #expect(Self.statField(daemon.daemonPID, 19) == startNice + 10, "the daemon's own thread keeps the renice")
        let after = accumulate(try daemon.streams.open(token: bytes("u-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(id: "u", argv: ["sh", "-c", "cat /proc/self/stat"], stdout: daemon.spec("u-out")))
        try await eventually("its exit") { exits.count("u") == 1 }
        try await eventually("its line") { after.bytes.last == UInt8(ascii: "\n") }
        let upgraded = String(decoding: after.bytes, as: UTF8.self)
        let upgradedFields = upgraded[upgraded.index(after: try #require(upgraded.lastIndex(of: ")")))...].split(separator: " ")
        #expect(Int(upgradedFields[19 - 3]) == startNice, "after a live upgrade too: \(upgraded)")
        #expect(Int(upgradedFields[41 - 3]) == 0, "after a live upgrade too: \(upgraded)")
        #expect(try await daemon.stop() == .exited(0))
    }
}
