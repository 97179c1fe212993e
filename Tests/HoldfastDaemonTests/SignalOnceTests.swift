import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A signal whose reply was lost is sent again by the host (`BridgeServer.signal`, with the same
/// idempotency key) and delivered once. Before, the host's retry delivered it twice: to many
/// programs a second SIGTERM or SIGINT means "now, skip the graceful part".
@Suite("A signal sent again after a lost reply is delivered once", .serialized, .timeLimit(.minutes(3)))
struct SignalOnceTests {
    /// A process that appends a line to `counted` for every SIGTERM it gets, and touches `ready`
    /// once its trap is set.
    static func counter(_ daemon: DaemonFixture, id: String) async throws -> (counted: String, pid: Int32) {
        let counted = daemon.directory.file("\(id).terms")
        let ready = daemon.directory.file("\(id).ready")
        let pid = try await daemon.bridge.create(
            ProcessSpec(id: id, argv: ["sh", "-c", "trap 'echo term >> \(counted)' TERM; touch \(ready); while :; do sleep 0.05; done"]),
            timeout: .seconds(15))
        try await eventually("\(id)'s trap set") { access(ready, F_OK) == 0 }
        return (counted, pid)
    }

    static func terms(_ counted: String) -> Int {
        String(decoding: readFile(counted) ?? [], as: UTF8.self).split(separator: "\n").count
    }

    /// The SIGTERM has reached the process and the worker holds its reply (the debug failpoint
    /// `bridge-reply-late`, as a worker short of CPU would, until the test opens `gate`): `lose`
    /// loses that reply; the signal call still succeeds, and the process counted one SIGTERM.
    /// Returns whether the reply was lost and the signal sent again.
    @discardableResult
    func expectDeliveredOnce(
        _ daemon: DaemonFixture, exits: ExitLog, gate: FailpointGate, id: String = "counts", losingTheReplyBy lose: () async throws -> Void
    ) async throws -> Bool {
        let (counted, _) = try await Self.counter(daemon, id: id)
        let repeatedBefore = daemon.bridge.repeatedSignals
        let signalled = Task { try await daemon.bridge.signal(id, SIGTERM, timeout: .seconds(30)) }
        try await eventually("the SIGTERM delivered") { Self.terms(counted) == 1 }
        try await lose()
        try gate.open()
        try await signalled.value
        let repeated = daemon.bridge.repeatedSignals - repeatedBefore
        #expect(repeated <= 1, "sent again at most once")
        try await Task.sleep(for: .milliseconds(500))
        #expect(Self.terms(counted) == 1, "delivered once: \(Self.terms(counted)) SIGTERMs counted")
        // (Its line reaches the file through the log's writer thread: waited for.)
        if repeated == 1 { try await daemon.waitForLog("signal repeated: already sent") }
        try await daemon.bridge.signal(id, SIGKILL, timeout: .seconds(30))
        try await eventually("the exit reported") { exits.count(id) == 1 }
        #expect(exits.all.first { $0.id == id }?.exitCode == 128 + SIGKILL)
        return repeated == 1
    }

    @Test(.enabled(if: DaemonFixture.canRun && Failpoint.compiledIn, "needs root and a debug build (a failpoint holds the reply)"))
    func aSignalWhoseReplyIsLostWithTheBridgeIsDeliveredOnce() async throws {
        let gate = try FailpointGate()
        defer { gate.remove() }
        let daemon = try await DaemonFixture(
            extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"",
            environment: gate.environment.merging(["HOLDFAST_FAILPOINT": "\(Failpoint.bridgeReplyLate):signal"]) { $1 })
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let repeated = try await expectDeliveredOnce(daemon, exits: exits, gate: gate) { daemon.bridge.drop(refusing: false) }
        #expect(repeated, "the drop lost the reply: sent again once")
        // An operator sees the repeat.
        let response = try await httpExchange(.unix(path: daemon.directory.file("metrics.sock")), "GET /metrics HTTP/1.1\r\nHost: guest\r\n\r\n")
        #expect(parsePrometheus(response)["holdfast_signals_repeated_total"] == 1, "\(response.suffix(2000))")
    }

    /// A live upgrade stops the bridge worker with the reply unwritten: the repeat reaches the
    /// next binary, which knows the signal was sent (the process's keys are in the state it
    /// was handed).
    @Test(.enabled(if: DaemonFixture.canRun && Failpoint.compiledIn, "needs root and a debug build (a failpoint holds the reply)"))
    func aSignalWhoseReplyALiveUpgradeLostIsDeliveredOnce() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let gate = try FailpointGate()
        defer { gate.remove() }
        let daemon = try await DaemonFixture(
            environment: gate.environment.merging(["HOLDFAST_FAILPOINT": "\(Failpoint.bridgeReplyLate):signal"]) { $1 }, executable: binary.path)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        // The worker holds the reply until the upgrade is done (the gate opens after it): the
        // upgrade stops the worker with the reply unwritten, whatever time it took.
        _ = try binary.install(variant: 1)
        let repeated = try await expectDeliveredOnce(daemon, exits: exits, gate: gate) {
            let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
            #expect(upgrade.status == .exited(0), "\(upgrade.output)\n\(daemon.log.suffix(4000))")
        }
        #expect(repeated, "the upgrade lost the reply: sent again once")
        #expect(try await daemon.status().upgrades == 1)
    }

    /// A SIGKILL's reply lost after the exit it caused was acknowledged and the process
    /// forgotten: the repeat finds no process, and is answered as the signal it repeats (the
    /// keys of a forgotten process's signals are remembered), not `no-such-process`, as the
    /// soak once saw it.
    @Test(.enabled(if: DaemonFixture.canRun && Failpoint.compiledIn, "needs root and a debug build (a failpoint holds the reply)"))
    func aSIGKILLRepeatedAfterItsProcessWasForgottenIsAnswered() async throws {
        let gate = try FailpointGate()
        defer { gate.remove() }
        let daemon = try await DaemonFixture(environment: gate.environment.merging(["HOLDFAST_FAILPOINT": "\(Failpoint.bridgeReplyLate):signal"]) { $1 })
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        _ = try await daemon.bridge.create(ProcessSpec(id: "gone", argv: ["sleep", "3600"]), timeout: .seconds(15))
        let asked = ContinuousClock.now
        let signalled = Task { try await daemon.bridge.signal("gone", SIGKILL, timeout: .seconds(30)) }
        try await eventually("its exit at the host") { exits.count("gone") == 1 }
        try await eventually("the guest forgot it") { try await !daemon.status().processes.contains { $0.id == "gone" } }
        let forgotten = ContinuousClock.now - asked
        daemon.bridge.drop(refusing: false)
        try gate.open()
        try await signalled.value
        #expect(daemon.bridge.repeatedSignals == 1, "sent again once")
        #expect(exits.all.map(\.signal) == [SIGKILL])
        print("a SIGKILL's exit acknowledged and its process forgotten \(forgotten) after it was asked; its repeat answered")
    }
}
