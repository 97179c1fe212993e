import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Any guest process can dial the host's bridge port (vsock is not namespaced), and a flood of
/// silent connections pushed the oldest in their handshake out — the daemon's among them (over a
/// Unix listener, 35,000 connections a second from an unprivileged process kept the guest off the
/// bridge for 20 s and more). The daemon's bridge worker dials from a reserved source port (below
/// 1024: only a privileged process can bind one, TCP and vsock alike), and the host admits such
/// connections in a pool of their own (`BridgeServerAuthenticationTests` shows the pools apart).
@Suite("The guest's bridge worker dials from a reserved port", .timeLimit(.minutes(3)))
struct BridgeReservedPortTests {
    /// Over TCP on loopback, as vsock would be: the host counts the guest's connection a
    /// privileged peer's, at the first connection and after a migration.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func theBridgeWorkerDialsFromAReservedPort() async throws {
        let daemon = try await DaemonFixture(bridgeOverTCP: true)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        #expect(daemon.bridge.privilegedConnections >= 1, "the first connection")
        let before = daemon.bridge.privilegedConnections
        daemon.bridge.drop(refusing: false)
        try await eventually("the guest back on the bridge") { daemon.bridge.isConnected && daemon.bridge.privilegedConnections > before }
        _ = try await daemon.bridge.create(ProcessSpec(id: "after", argv: ["true"]))
        try await eventually("its exit") { exits.count("after") == 1 }
        #expect(daemon.bridge.refusedConnections == 0)
        #expect(try await daemon.stop() == .exited(0))
    }
}
