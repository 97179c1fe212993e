import HoldfastCore
import HoldfastPosix
import HoldfastProtocol

/// Accepts the guest's bridge connection on a test's own listener and completes the
/// authentication handshake as the host. A guest that gave up on a connection the test was too
/// slow to answer (its handshake timeout, on a starved machine) redials: that connection is
/// closed and the next one tried, until `timeout`. What the test then asserts starts from an
/// authenticated connection, as it would from a host that answered in time.
public func acceptAuthenticatedGuest(on listener: Listener, key: BridgeKey, timeout: Duration = .seconds(60)) async throws -> AsyncFD {
    let deadline = ContinuousClock.now + timeout
    while true {
        let left = deadline - ContinuousClock.now
        let connection = try await withTimeout("the guest's bridge connection", max(left, .milliseconds(1))) { try await listener.accept() }
        do {
            try await BridgeHandshake.authenticateGuest(on: connection, key: key)
            return connection
        } catch .connectionLost where ContinuousClock.now < deadline {
            connection.close()
        }
    }
}
