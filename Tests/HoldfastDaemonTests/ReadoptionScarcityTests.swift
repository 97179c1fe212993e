import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// After a broker crash the supervisor hands every process to the next broker on copies of the
/// fds it keeps. A copy that fails for want of fds (EMFILE) gave the process's streams up for
/// good — its output cut short — however soon fds came free. Now such a process is tried again
/// for up to 10 s (`Supervisor.readoptionFdWait`), and given up only past that, so a lasting
/// scarcity still cannot hold creates and handoff runtimes for ever. Debug-build failpoints
/// fail the copies of one process, as its open-file limit would.
@Suite("A broker restart short of fds for a moment loses nothing", .timeLimit(.minutes(3)))
struct ReadoptionScarcityTests {
    static let waiting = "no fds to hand a process to the restarted broker: trying again"
    static let givenUp = "cannot copy a process's fds for the restarted broker: its streams are given up"

    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the copies fail at a failpoint, which only debug builds have"))
    func aProcessWhoseCopiesFailForAMomentIsHandedOverWhenTheyWork() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.readoptionCopyFails):p1"])
        defer { daemon.cleanUp() }
        let go = daemon.directory.file("go")
        let received = try await DescriptorLimitTests.startPrinters(daemon, ids: ["p1", "p2"], go: go)
        try await eventually("both streams connected") {
            try await daemon.brokerStreams().filter { $0.state == .connected }.count == 2
        }
        try await DescriptorLimitTests.killTheBroker(daemon, expecting: 2)
        try await daemon.waitForLog(Self.waiting)
        #expect(daemon.log.components(separatedBy: Self.waiting).count - 1 == 1, "said once, not per try")
        #expect(!daemon.log.contains(Self.givenUp))
        try await eventually("both streams with the next broker") {
            try await daemon.brokerStreams().filter { $0.state == .connected }.map(\.process).sorted() == ["p1", "p2"]
        }
        try writeFile(go, [])
        for id in ["p1", "p2"] {
            let report = try await daemon.wait(id)
            #expect(report.exitCode == 0 && report.outputCutShort == nil, "\(id): \(report)")
            #expect(await received[id]!.value == DescriptorLimitTests.printed, "\(id)'s output, exact")
        }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// The broker cannot watch a process's fds for a moment (epoll's ENOSPC: its uid's
    /// `fs.epoll.max_user_watches`, shared with processes of that uid in other pid namespaces,
    /// used up; or ENOMEM): it refuses `resource-shortage`, and the supervisor tries again as for
    /// fds. Before, the refusal read as a bad fd: the process ran on unrelayed until the next
    /// broker — its output pipe full, its writer blocked. Reached through a live upgrade.
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the broker refuses at a failpoint, which only debug builds have"))
    func aProcessTheNextBrokerCannotWatchForAMomentIsHandedOverWhenItCan() async throws {
        try await Self.refusedAfterAnUpgradeThenHandedOver(failpoint: Failpoint.readoptionWatchRefused, refusal: "EPOLL_CTL_ADD) (failpoint)")
    }

    /// The copies work, but the broker refuses the handover as `too-many-open-files` (the fds
    /// sent did not all arrive: the broker at its limit): the supervisor tries that process
    /// again too, and loses nothing. Reached through a live upgrade, whose new image's first
    /// broker takes every stream over as a restarted broker does.
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the broker refuses at a failpoint, which only debug builds have"))
    func aProcessTheNextBrokerRefusesForWantOfFdsIsHandedOverWhenItHasRoom() async throws {
        try await Self.refusedAfterAnUpgradeThenHandedOver(failpoint: Failpoint.readoptionRefusedForFds, refusal: "did not all arrive (failpoint)")
    }

    /// Two printers, p1 and p2; a live upgrade whose new image's first broker refuses p1's
    /// handover at `failpoint` (its first tries, saying `refusal`); every line of both exact, no
    /// exit cut short, and p1 never given up.
    static func refusedAfterAnUpgradeThenHandedOver(failpoint: String, refusal: String) async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(failpoint):p1"])
        defer { daemon.cleanUp() }
        let go = daemon.directory.file("go")
        let received = try await DescriptorLimitTests.startPrinters(daemon, ids: ["p1", "p2"], go: go)
        try await eventually("both streams connected") {
            try await daemon.brokerStreams().filter { $0.state == .connected }.count == 2
        }
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        try await eventually("the broker refused p1 once at least", timeout: .seconds(30)) { daemon.log.contains(refusal) }
        try writeFile(go, [])
        for id in ["p1", "p2"] {
            // Bounded: a process left unrelayed never exits (its output pipe full).
            let report = try await withDeadline("\(id)'s exit", .seconds(60)) { try await daemon.wait(id) }
            #expect(report.exitCode == 0 && report.outputCutShort == nil, "\(id): \(report)")
            let output = try await withTimeout("\(id)'s output", .seconds(30)) { await received[id]!.value }
            #expect(output == DescriptorLimitTests.printed, "\(id)'s output, exact")
        }
        // The lines reach the file through the log's writer thread: the hand-over's last line
        // (logged once every process was handed or given up) is waited for before the log is
        // read, so a give-up would be in it.
        try await daemon.waitForLog(Self.waiting)
        try await daemon.waitForLog("the restarted broker took processes over")
        #expect(!daemon.log.contains("the restarted broker refused a process's streams"), "not given up")
        #expect(try await daemon.stop() == .exited(0))
    }

    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the copies fail at a failpoint, which only debug builds have"))
    func aProcessWhoseCopiesNeverWorkIsGivenUpAndHoldsNothingElse() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.readoptionCopyAlwaysFails):p1"])
        defer { daemon.cleanUp() }
        let go = daemon.directory.file("go")
        let received = try await DescriptorLimitTests.startPrinters(daemon, ids: ["p1", "p2"], go: go)
        try await eventually("both streams connected") {
            try await daemon.brokerStreams().filter { $0.state == .connected }.count == 2
        }
        let broker = try #require(try await daemon.rolePID("broker"))
        kill(broker, SIGKILL)
        try await daemon.waitForLog(Self.waiting)
        // A create waits for the restarted broker's readoption: it is served once p1 is given up.
        let late = try daemon.streams.open(token: bytes("late-out"), direction: .receive)
        let lateReceived = collect(late)
        let launched = Task { try await daemon.launch(ProcessSpec(id: "late", argv: ["echo", "served"], stdout: daemon.spec("late-out"))) }
        try await daemon.waitForLog(Self.givenUp)
        _ = try await withTimeout("the create that waited", .seconds(30)) { try await launched.value }
        #expect(await lateReceived.value == bytes("served\n"))
        // p2 was handed over meanwhile and loses nothing; p1's exit is reported, cut short.
        try writeFile(go, [])
        let p2 = try await daemon.wait("p2")
        #expect(p2.exitCode == 0 && p2.outputCutShort == nil, "\(p2)")
        #expect(await received["p2"]!.value == DescriptorLimitTests.printed, "p2's output, exact")
        let p1 = try await daemon.wait("p1")
        #expect(p1.outputCutShort == true, "p1's exit says its output was cut short: \(p1)")
        #expect(try await daemon.stop() == .exited(0))
    }
}
