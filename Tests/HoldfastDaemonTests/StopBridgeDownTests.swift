import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A daemon stop that comes while the bridge is down (a migration under way, or the new bridge
/// worker of a live upgrade not connected yet) and the bridge comes back a moment later: the
/// stop's exits still reach the host. Before, the stop looked for a connected host once: the
/// bridge down, it ended at once, and every exit of the stop was lost with the daemon (a loaded
/// run's stop 0.6 s after an upgrade lost its one exit so).
@Suite("A stop while the bridge is down", .serialized, .timeLimit(.minutes(2)))
struct StopBridgeDownTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aBridgeBackWithinMomentsStillHearsTheStopsExits() async throws {
        let daemon = try await DaemonFixture(shutdown: ("2s", "10s"), bridgeThroughProxy: true)
        defer { daemon.cleanUp() }
        let proxy = try #require(daemon.proxy)
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let ready = daemon.directory.file("trapped")
        for id in ["a", "b"] {
            _ = try await daemon.bridge.create(ProcessSpec(
                id: id, argv: ["sh", "-c", "trap 'touch \(ready)-\(id)-ended; exit 7' TERM; touch \(ready)-\(id); while :; do sleep 0.05; done"]))
        }
        // Each has its trap in place (a loaded run's stop came before one had, which ended it
        // 143 rather than 7).
        try await eventually("both traps set") { ["a", "b"].allSatisfy { access("\(ready)-\($0)", F_OK) == 0 } }
        // The bridge goes down and stays down (each redial is answered and closed at once) ...
        proxy.impersonate { _ in }
        proxy.dropAll()
        try await eventually("the bridge down", timeout: .seconds(20)) { try await daemon.status().bridge != .up }
        // ... the stop comes, and the bridge is back once both processes ended on its SIGTERM:
        // their exits wait for a host then, with the bridge still down. (Waited for, not slept:
        // a fixed second measured the machine's load, and a starved test process woke past the
        // stop's wait for the bridge, `bridgeWaitAtStop`, which begins only after the drains.)
        let supervisor = daemon.daemonPID
        #expect(kill(supervisor, SIGTERM) == 0)
        try await daemon.waitForLog("shutting down")
        try await eventually("both processes ended by the stop") { ["a", "b"].allSatisfy { access("\(ready)-\($0)-ended", F_OK) == 0 } }
        proxy.impersonate(nil)

        let status = try await daemon.processes.wait(supervisor, timeout: .seconds(30))
        #expect(status == .exited(0))
        // The host's exit log is filled by a task of its own: the last exit may be read in it
        // a moment after the daemon is gone.
        try await eventually("each exit of the stop at the host") { exits.count("a") >= 1 && exits.count("b") >= 1 }
        #expect(exits.count("a") == 1 && exits.count("b") == 1, "each exit of the stop reached the host once: \(exits.all); \(daemon.log.suffix(3000))")
        #expect(exits.all.allSatisfy { $0.exitCode == 7 }, "\(exits.all)")
    }

    /// A host gone for good costs the stop that moment (2 s), no more: it does not wait out its
    /// timeout for a bridge that does not come back. The timeout is ten minutes, so a stop that
    /// waited it out fails the wait's hang bound below: no elapsed time is asserted.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aBridgeThatStaysDownDelaysTheStopOnlyAMoment() async throws {
        let daemon = try await DaemonFixture(shutdown: ("2s", "10m"), bridgeThroughProxy: true)
        defer { daemon.cleanUp() }
        let proxy = try #require(daemon.proxy)
        _ = try await daemon.bridge.create(ProcessSpec(id: "a", argv: ["sh", "-c", "trap 'exit 7' TERM; while :; do sleep 0.05; done"]))
        proxy.impersonate { _ in }
        proxy.dropAll()
        try await eventually("the bridge down", timeout: .seconds(20)) { try await daemon.status().bridge != .up }
        let supervisor = daemon.daemonPID
        #expect(kill(supervisor, SIGTERM) == 0)
        let status = try await daemon.processes.wait(supervisor, timeout: .seconds(60))
        #expect(status == .exited(0))
    }
}
