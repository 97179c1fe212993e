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
/// bridge for 20 s and more). The daemon's bridge worker says who it is before any round trip:
/// its challenge's nonce carries the key's voucher, and it dials from a reserved source port
/// (below 1024: only a privileged process can bind one, TCP and vsock alike); the host admits
/// such connections in a pool of their own (`BridgeServerAuthenticationTests` shows the pools
/// apart under a flood).
@Suite("The guest's bridge worker is told apart from a flood", .timeLimit(.minutes(3)))
struct BridgeReservedPortTests {
    /// Over TCP on loopback, as vsock would be: the host counts the guest's connection one from
    /// a reserved port, at the first connection and after a migration.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func theBridgeWorkerDialsFromAReservedPort() async throws {
        let daemon = try await DaemonFixture(bridgeOverTCP: true)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        #expect(daemon.bridge.reservedPortConnections >= 1, "the first connection")
        let before = daemon.bridge.reservedPortConnections
        daemon.bridge.drop(refusing: false)
        try await eventually("the guest back on the bridge") { daemon.bridge.isConnected && daemon.bridge.reservedPortConnections > before }
        _ = try await daemon.bridge.create(ProcessSpec(id: "after", argv: ["true"]))
        try await eventually("its exit") { exits.count("after") == 1 }
        #expect(daemon.bridge.refusedConnections == 0)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Over a Unix listener, which says nothing of ports (a VMM's hybrid vsock hands the host
    /// every guest connection over one): the worker's voucher is what sets it apart, at the first
    /// connection and after a migration.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func theBridgeWorkersChallengeVouchesForItOverAUnixSocket() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        #expect(daemon.bridge.vouchedConnections >= 1 && daemon.bridge.reservedPortConnections == 0, "the first connection")
        let before = daemon.bridge.vouchedConnections
        daemon.bridge.drop(refusing: false)
        try await eventually("the guest back on the bridge") { daemon.bridge.isConnected && daemon.bridge.vouchedConnections > before }
        #expect(daemon.bridge.vouchedConnections == daemon.bridge.acceptedConnections, "every connection of the guest vouched for")
        #expect(daemon.bridge.refusedConnections == 0)
        #expect(try await daemon.stop() == .exited(0))
    }
}
