import HoldfastCore
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

/// A frame that cannot be sent (the kernel out of memory for it: ENOBUFS past the retries)
/// must end the channel, not leave it open with the frame lost: both ends treat a closed channel
/// as the peer gone, and between roles that restarts the role, whose successor is told
/// everything again. Left open, a lost request was reported `channel-closed` while nothing
/// closed (the supervisor's `process-exited` never sent again: an exit never reported), a lost
/// reply left its asker waiting for ever, a lost notification (a bridge up) was never said again.
@Suite("A frame that cannot be sent ends its channel", .timeLimit(.minutes(2)))
struct RPCSendFailureTests {
    /// A transport whose sends fail while `failing`, and whose receive waits for frames pushed
    /// into it until it is closed.
    final class ScriptedTransport: FrameTransport, Sendable {
        private let state = NIOLockedValueBox<(failing: Bool, closed: Bool, sent: [ControlFrame])>((true, false, []))
        let incoming: AsyncStream<ControlFrame>
        private let push: AsyncStream<ControlFrame>.Continuation

        init(failing: Bool = true) {
            (incoming, push) = AsyncStream.makeStream(of: ControlFrame.self)
            state.withLockedValue { $0.failing = failing }
        }

        var isClosed: Bool { state.withLockedValue { $0.closed } }
        var sent: [ControlFrame] { state.withLockedValue { $0.sent } }
        func deliver(_ frame: ControlFrame) { push.yield(frame) }

        func receive() async throws(FrameTransportError) -> (frame: ControlFrame, descriptors: [Int32]) {
            for await frame in incoming { return (frame, []) }
            throw .ended
        }

        func send(_ frame: ControlFrame, descriptors: [Int32]) async throws(FrameTransportError) {
            let failing = state.withLockedValue { s -> Bool in
                if !s.failing { s.sent.append(frame) }
                return s.failing || s.closed
            }
            if failing { throw .broken("sendmsg: No buffer space available (errno 105)") }
        }

        func close() {
            state.withLockedValue { $0.closed = true }
            push.finish()
        }
    }

    enum Ping: RPCRequest, Equatable {
        case ping
        static func decode(type: UInt32, body: [UInt8], descriptorCount: Int) throws(HoldfastError) -> Ping { .ping }
        var frameType: UInt32 { 0x7001 }
        var body: [UInt8] { RPCBody.empty }
    }

    @Test func aRequestThatCannotBeSentClosesTheClient() async throws {
        let transport = ScriptedTransport()
        let client = RPCClient(transport: transport, closeDescriptors: { _ in })
        let reader = Task { await client.run() }
        await #expect(throws: HoldfastError.self) { try await client.request(0x7001, body: RPCBody.empty) }
        #expect(transport.isClosed, "the channel the error calls closed is closed")
        try await withTimeout("the client's reader to end") { await reader.value }
        #expect(client.isClosed, "and the client knows: every later request fails at once")
        await #expect(throws: HoldfastError.self) { try await client.request(0x7001, body: RPCBody.empty) }
    }

    @Test func aNotificationThatCannotBeSentClosesTheClient() async throws {
        let transport = ScriptedTransport()
        let client = RPCClient(transport: transport, closeDescriptors: { _ in })
        let reader = Task { await client.run() }
        await #expect(throws: FrameTransportError.self) { try await client.notify(0x7002) }
        #expect(transport.isClosed)
        try await withTimeout("the client's reader to end") { await reader.value }
        #expect(client.isClosed)
    }

    @Test func aReplyThatCannotBeSentEndsTheServer() async throws {
        let transport = ScriptedTransport()
        let served = Task {
            await RPCServer.serve(transport, as: Ping.self, inFlight: 4, closeDescriptors: { _ in }) { _, _ async throws(HoldfastError) in .empty }
        }
        transport.deliver(Ping.ping.frame(id: 7))
        // The asker would otherwise wait for ever: the connection ends, and the server with it.
        let end = try await withTimeout("the server's end") { await served.value }
        #expect(end == .closedByPeer, "\(end)")
        #expect(transport.isClosed && transport.sent.isEmpty)
    }
}
