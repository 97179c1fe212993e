import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

/// A request that failed `bridge-lost` is sent again by its caller at once (the soak's signals
/// were, `create` and `signal` are by the library, and so would any host's retry loop): it must
/// wait for the next guest, never be handed the connection that was just lost. The soak once
/// saw a signal fail `bridge-lost` 30 times in a row, in a moment, and give up: a caller's retry
/// ran before the lost connection's task took it out of service.
@Suite("A lost bridge connection is never handed out again", .timeLimit(.minutes(3)))
struct BridgeServerLostConnectionTests {
    typealias ScriptedGuest = BridgeServerCreateTests.ScriptedGuest

    @Test func aRequestSentAgainAfterBridgeLostWaitsForTheNextGuest() async throws {
        let (directory, bridge) = try BridgeServerCreateTests.startBridge()
        defer {
            bridge.close()
            directory.remove()
        }
        let callers = 16
        for round in 0..<30 {
            let guest = try await ScriptedGuest.connect(bridge.address, key: BridgeServerCreateTests.key)
            #expect(await bridge.waitForGuest(timeout: .seconds(10)))
            // Every caller's request reaches the guest, which answers none and goes away; each
            // caller asks again at once, once more after that at most. (A list: `signal` and
            // `create` send themselves again after `bridge-lost`, with the same key.)
            let attempts = (0..<callers).map { caller in
                Task { () -> [String] in
                    var outcomes: [String] = []
                    for attempt in 0..<3 {
                        do throws(HoldfastError) {
                            // The first waits for the guest to go, however loaded the machine;
                            // the others only briefly for a guest that is not coming.
                            _ = try await bridge.list(timeout: attempt == 0 ? .seconds(60) : .milliseconds(300))
                            outcomes.append("ok")
                            break
                        } catch {
                            outcomes.append(error.code.rawValue)
                            if error.code != .bridgeLost { break }
                        }
                    }
                    return outcomes
                }
            }
            for _ in 0..<callers {
                let frame = try await withTimeout("a caller's list") { try await ControlFrameIO.read(from: guest.socket, maxBody: BridgeProtocol.maxBody) }
                #expect(frame.type == BridgeMessageType.list.rawValue)
            }
            guest.socket.close()
            for (caller, attempt) in attempts.enumerated() {
                let outcomes = await attempt.value
                #expect(outcomes == ["bridge-lost", "no-guest"], "round \(round), caller \(caller): lost once, then no guest until the next one")
            }
        }
    }
}
