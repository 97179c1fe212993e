import Glibc
import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

/// `exitAcknowledgement: .byCaller`: an exit is acknowledged to the guest only once the caller
/// says it handled it, so a host agent that dies between the delivery and its handling is given
/// the exit again (the guest repeats it in its next hello). With `.onDelivery` (the default) the
/// acknowledgement goes out as the exit is delivered.
@Suite("The host acknowledges an exit when its caller handled it", .timeLimit(.minutes(2)))
struct BridgeServerExitAcknowledgementTests {
    typealias Guest = BridgeServerCreateTests.ScriptedGuest

    static let exit = ExitReport(id: "job", exitCode: 3, signal: nil, undelivered: 0)
    static let hello = BridgeHello(bootID: "00000000-0000-0000-0000-000000000000", processes: [], exits: [exit])

    static func firstExit(_ bridge: BridgeServer) async throws -> ExitReport? {
        try await withTimeout("the exit") {
            var iterator = bridge.exits.makeAsyncIterator()
            return await iterator.next()
        }
    }

    @Test func anExitIsAcknowledgedOnlyOnceTheCallerHandledIt() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let address = SocketAddress.unix(path: directory.file("bridge.sock"))
        let bridge = try BridgeServer(listeningOn: address, authentication: .key(BridgeServerCreateTests.key), exitAcknowledgement: .byCaller)
        bridge.start()
        let guest = try await Guest.connect(address, key: BridgeServerCreateTests.key, hello: Self.hello)
        #expect(try await Self.firstExit(bridge) == Self.exit)
        // Not yet acknowledged: the next request the guest reads is the caller's signal.
        let signalled = Task { () async -> HoldfastError? in
            do throws(HoldfastError) {
                try await bridge.signal("other", SIGTERM)
                return nil
            } catch {
                return error
            }
        }
        let (signal, _) = try await guest.next(.signal, SignalRequest.self)
        try await guest.reply(to: signal, [String: String]())
        #expect(await signalled.value == nil)
        // Handled: now the acknowledgement.
        bridge.acknowledgeExit("job")
        let (acknowledgement, body) = try await guest.next(.acknowledgeExit, AcknowledgeExitRequest.self)
        #expect(body.id == "job")
        try await guest.reply(to: acknowledgement, [String: String]())
        guest.socket.close()
        bridge.close()

        // A host agent that died before handling it: the guest repeats it in its next hello to
        // the next agent, which delivers it.
        let next = try BridgeServer(listeningOn: .unix(path: directory.file("bridge2.sock")), authentication: .key(BridgeServerCreateTests.key), exitAcknowledgement: .byCaller)
        next.start()
        defer { next.close() }
        let again = try await Guest.connect(next.address, key: BridgeServerCreateTests.key, hello: Self.hello)
        defer { again.socket.close() }
        #expect(try await Self.firstExit(next) == Self.exit, "given again to an agent that had not handled it")
    }

    @Test func byDefaultAnExitIsAcknowledgedAsItIsDelivered() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let address = SocketAddress.unix(path: directory.file("bridge.sock"))
        let bridge = try BridgeServer(listeningOn: address, authentication: .key(BridgeServerCreateTests.key))
        bridge.start()
        defer { bridge.close() }
        let guest = try await Guest.connect(address, key: BridgeServerCreateTests.key, hello: Self.hello)
        defer { guest.socket.close() }
        #expect(try await Self.firstExit(bridge) == Self.exit)
        let (acknowledgement, body) = try await guest.next(.acknowledgeExit, AcknowledgeExitRequest.self)
        #expect(body.id == "job")
        try await guest.reply(to: acknowledgement, [String: String]())
    }
}
