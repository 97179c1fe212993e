import HoldfastCore
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

/// A frame whose fds did not all arrive (the receiver at its limit on open files: MSG_CTRUNC).
/// A reply fails its request and the channel goes on; a notification — the broker's deposit of
/// a handoff process's fds — reaches its handler without them, so the supervisor can answer that
/// it keeps nothing. Before, such a notification vanished: the broker told the runtime its
/// process survives a broker crash, and the supervisor held no copy of its fds.
@Suite("A frame whose fds did not arrive", .timeLimit(.minutes(1)))
struct RPCRefusedFrameTests {
    /// Gives the client each scripted outcome in turn (once `afterSends` frames were sent: a
    /// reply after its request), then waits until closed.
    final class ShortTransport: FrameTransport, Sendable {
        private let script: NIOLockedValueBox<[Result<ControlFrame, FrameTransportError>]>
        let sent = NIOLockedValueBox<[ControlFrame]>([])
        private let closed = NIOLockedValueBox(false)
        private let afterSends: Int

        init(_ script: [Result<ControlFrame, FrameTransportError>], afterSends: Int = 0) {
            self.script = NIOLockedValueBox(script)
            self.afterSends = afterSends
        }

        func receive() async throws(FrameTransportError) -> (frame: ControlFrame, descriptors: [Int32]) {
            while true {
                if closed.withLockedValue({ $0 }) { throw .ended }
                if sent.withLockedValue({ $0.count }) >= afterSends, let next = script.withLockedValue({ $0.isEmpty ? nil : $0.removeFirst() }) {
                    return (try next.get(), [7])
                }
                try? await Task.sleep(for: .milliseconds(5))
            }
        }

        func send(_ frame: ControlFrame, descriptors: [Int32]) async throws(FrameTransportError) {
            sent.withLockedValue { $0.append(frame) }
        }

        func close() { closed.withLockedValue { $0 = true } }
    }

    static let noFiles = HoldfastError(.tooManyOpenFiles, "the fds sent with this request did not all arrive")

    @Test func aNotificationIsDeliveredWithoutItsFdsAndTheChannelGoesOn() async throws {
        let deposit = ControlFrame(type: 0x0203, id: 0, body: Array("deposit".utf8))
        let after = ControlFrame(type: 0x0201, id: 0, body: Array("next".utf8))
        let transport = ShortTransport([.failure(.refused(deposit, Self.noFiles)), .success(after)])
        let heard = NIOLockedValueBox<[(ControlFrame, [Int32])]>([])
        let client = RPCClient(transport: transport, closeDescriptors: { _ in }) { frame, descriptors in
            heard.withLockedValue { $0.append((frame, descriptors)) }
        }
        let reader = Task { await client.run() }
        defer { client.close() }
        try await eventually("both notifications", timeout: .seconds(10)) { heard.withLockedValue { $0.count } == 2 }
        let (first, second) = heard.withLockedValue { ($0[0], $0[1]) }
        #expect(first.0 == deposit && first.1.isEmpty, "the deposit, without fds")
        #expect(second.0 == after && second.1 == [7], "the channel went on")
        #expect(!client.isClosed)
        client.close()
        await reader.value
    }

    @Test func aReplyFailsItsRequestAndTheChannelGoesOn() async throws {
        let reply = ControlFrame(type: RPCFrameType.ok, id: 1, body: [])
        let transport = ShortTransport([.failure(.refused(reply, Self.noFiles))], afterSends: 1)
        let client = RPCClient(transport: transport, closeDescriptors: { _ in })
        let reader = Task { await client.run() }
        defer { client.close() }
        let error = await #expect(throws: HoldfastError.self) { try await client.request(0x7001, body: RPCBody.empty) }
        #expect(error?.code == .tooManyOpenFiles)
        #expect(!client.isClosed)
        client.close()
        await reader.value
    }
}
