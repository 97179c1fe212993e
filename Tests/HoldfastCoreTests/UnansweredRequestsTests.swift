import HoldfastCore
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

/// `RPCServer` counts a request from its arrival until its reply is written: the bridge worker
/// waits on that count before a daemon stop ends it, so that no reply it owes the host is lost.
@Suite("A server's unanswered requests", .timeLimit(.minutes(1)))
struct UnansweredRequestsTests {
    typealias Ping = RPCSendFailureTests.Ping

    @Test func aRequestCountsUntilItsReplyIsWrittenAnErrorAsWell() async throws {
        let transport = RPCSendFailureTests.ScriptedTransport(failing: false)
        let unanswered = UnansweredRequests()
        let released = NIOLockedValueBox(false)
        let handled = NIOLockedValueBox(0)
        let served = Task {
            await RPCServer.serve(transport, as: Ping.self, inFlight: 4, unanswered: unanswered, closeDescriptors: { _ in }) {
                _, _ async throws(HoldfastError) -> RPCReply in
                while !released.withLockedValue({ $0 }) { try? await Task.sleep(for: .milliseconds(5)) }
                guard handled.withLockedValue({ $0 += 1; return $0 }) == 2 else { return .empty }
                throw HoldfastError(.badRequest, "the second one fails")
            }
        }
        defer { served.cancel() }
        await unanswered.waitUntilNone()  // none yet: returns at once
        transport.deliver(Ping.ping.frame(id: 1))
        transport.deliver(Ping.ping.frame(id: 2))
        try await eventually("both requests read") { unanswered.count == 2 }
        let waited = NIOLockedValueBox(false)
        let waiter = Task {
            await unanswered.waitUntilNone()
            waited.withLockedValue { $0 = true }
            return transport.sent
        }
        try await Task.sleep(for: .milliseconds(100))
        #expect(!waited.withLockedValue { $0 }, "no reply written yet: still waiting")
        released.withLockedValue { $0 = true }
        let written = try await withTimeout("every reply written") { await waiter.value }
        #expect(written.map(\.id).sorted() == [1, 2], "both replies were written when the wait returned")
        #expect(written.map(\.type).sorted() == [RPCFrameType.ok, RPCFrameType.error].sorted(), "an error reply counts as an answer")
        #expect(unanswered.count == 0)
        transport.close()
        _ = await served.value
    }
}
