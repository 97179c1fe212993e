import Glibc
import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

/// `BridgeServer.create` and `signal` against a scripted guest: the bridge drops after the guest
/// has the request and before it replies — the case where the host cannot know whether it ran.
@Suite("The host's create and signal are exactly once across bridge drops", .timeLimit(.minutes(5)))
struct BridgeServerCreateTests {
    /// A guest's bridge connection: authenticates, says hello, then reads the host's requests.
    struct ScriptedGuest {
        let socket: AsyncFD

        static func connect(
            _ address: SocketAddress, key: BridgeKey,
            hello: BridgeHello = BridgeHello(bootID: "00000000-0000-0000-0000-000000000000", processes: [], exits: [])
        ) async throws -> ScriptedGuest {
            let socket = try await Dialer.connect(to: address)
            try await BridgeHandshake.authenticateHost(on: socket, key: key)
            try await FrameIO.write(ControlFrame(type: BridgeMessageType.hello.rawValue, id: 0, body: ControlJSON.encode(hello)).encoded, to: socket)
            return ScriptedGuest(socket: socket)
        }

        func nextCreate() async throws -> (frame: ControlFrame, spec: ProcessSpec) {
            let (frame, spec) = try await next(.create, ProcessSpec.self)
            return (frame, spec)
        }

        /// The host's next request, which must be of `type`, and its body.
        func next<Body: Decodable>(_ type: BridgeMessageType, _ body: Body.Type) async throws -> (frame: ControlFrame, body: Body) {
            let frame = try await withTimeout("the host's \(type)") { try await ControlFrameIO.read(from: socket, maxBody: BridgeProtocol.maxBody) }
            #expect(frame.type == type.rawValue)
            return (frame, try ControlJSON.decode(Body.self, from: frame.body, frameType: frame.type))
        }

        func reply(to frame: ControlFrame, _ response: some Encodable) async throws {
            try await FrameIO.write(ControlFrame(type: BridgeMessageType.ok.rawValue, id: frame.id, body: ControlJSON.encode(response)).encoded, to: socket)
        }
    }

    static let key = BridgeKey.generate()

    static func startBridge() throws -> (TemporaryDirectory, BridgeServer) {
        let directory = try TemporaryDirectory()
        let bridge = try BridgeServer(listeningOn: .unix(path: directory.file("bridge.sock")), authentication: .key(key))
        bridge.start()
        return (directory, bridge)
    }

    @Test func aCreateWhoseReplyIsLostIsSentAgainWithTheSameKey() async throws {
        let (directory, bridge) = try Self.startBridge()
        defer {
            bridge.close()
            directory.remove()
        }
        let address = bridge.address

        let created = Task { () throws(HoldfastError) -> Int32 in
            try await bridge.create(ProcessSpec(id: "job", argv: ["true"]), timeout: .seconds(60))
        }
        // First connection: the guest receives the create, then the connection dies.
        let first = try await ScriptedGuest.connect(address, key: Self.key)
        let (_, original) = try await first.nextCreate()
        let key = try #require(original.idempotencyKey, "the library names every create")
        #expect(key.utf8.count == 32)
        first.socket.close()

        // The next connection gets the same create, same key; the guest answers it as a repeat.
        let second = try await ScriptedGuest.connect(address, key: Self.key)
        defer { second.socket.close() }
        let (frame, repeated) = try await second.nextCreate()
        #expect(repeated == original, "the very same request, key included")
        try await second.reply(to: frame, LaunchResponse(pid: 4242, repeated: true))

        #expect(try await created.value == 4242)
        #expect(bridge.repeatedCreates == 1)
    }

    @Test func aKeyTheCallerChoseIsKeptAndOtherErrorsAreNotRepeated() async throws {
        let (directory, bridge) = try Self.startBridge()
        defer {
            bridge.close()
            directory.remove()
        }
        let address = bridge.address

        let created = Task { () throws(HoldfastError) -> Int32 in
            try await bridge.create(ProcessSpec(id: "job", argv: ["true"], idempotencyKey: "mine-1"), timeout: .seconds(60))
        }
        let guest = try await ScriptedGuest.connect(address, key: Self.key)
        defer { guest.socket.close() }
        let (frame, spec) = try await guest.nextCreate()
        #expect(spec.idempotencyKey == "mine-1")
        let refusal = HoldfastError(.processExists, "a process with id 'job' exists")
        try await FrameIO.write(ControlFrame(type: BridgeMessageType.error.rawValue, id: frame.id, body: ControlJSON.encode(refusal)).encoded, to: guest.socket)
        do {
            _ = try await created.value
            Issue.record("a refused create succeeded")
        } catch {
            #expect(error as? HoldfastError == refusal)
        }
        #expect(bridge.repeatedCreates == 0, "only a lost bridge repeats a create")
    }

    /// An exit delivered on a connection that was lost before the guest confirmed its
    /// acknowledgement (a bridge worker killed right after the ack was written), then a create
    /// of the same id: the guest's next hello still lists the old exit. It is not the new
    /// process's — the application sees it once, and then the new process's own exit. Before,
    /// the create forgot the old exit first: its copy in the hello was delivered as the new
    /// process's, and the new process's real exit was dropped as a repeat.
    @Test func anUnconfirmedExitIsNotTakenForANewProcessOfTheSameID() async throws {
        let (directory, bridge) = try Self.startBridge()
        defer {
            bridge.close()
            directory.remove()
        }
        let address = bridge.address
        let delivered = NIOLockedValueBox<[ExitReport]>([])
        let reader = Task { for await report in bridge.exits { delivered.withLockedValue { $0.append(report) } } }
        defer { reader.cancel() }
        let old = ExitReport(id: "job", exitCode: 3, signal: nil, undelivered: 0)
        let hello = BridgeHello(bootID: "00000000-0000-0000-0000-000000000000", processes: [], exits: [old], instanceID: "same", keyedSignals: true)

        // The exit is delivered; the connection dies with its acknowledgement unanswered.
        let first = try await ScriptedGuest.connect(address, key: Self.key, hello: hello)
        _ = try await first.next(.acknowledgeExit, AcknowledgeExitRequest.self)
        first.socket.close()
        try await eventually("the exit delivered") { delivered.withLockedValue { $0.count } == 1 }

        // The application runs the id again; the guest's next hello still has the old exit.
        let created = Task { () throws(HoldfastError) -> Int32 in
            try await bridge.create(ProcessSpec(id: "job", argv: ["true"]), timeout: .seconds(60))
        }
        let second = try await ScriptedGuest.connect(address, key: Self.key, hello: hello)
        defer { second.socket.close() }
        var acknowledged = 0
        while true {
            let frame = try await withTimeout("the host's next request") { try await ControlFrameIO.read(from: second.socket, maxBody: BridgeProtocol.maxBody) }
            if frame.type == BridgeMessageType.acknowledgeExit.rawValue {
                acknowledged += 1
                try await second.reply(to: frame, [String: String]())
                continue
            }
            #expect(frame.type == BridgeMessageType.create.rawValue)
            #expect(acknowledged >= 1, "the old exit acknowledged before the id was created again")
            try await second.reply(to: frame, LaunchResponse(pid: 77))
            break
        }
        #expect(try await created.value == 77)
        // The new process's own exit.
        let new = ExitReport(id: "job", exitCode: 0, signal: nil, undelivered: 0)
        try await FrameIO.write(ControlFrame(type: BridgeMessageType.exit.rawValue, id: 0, body: ControlJSON.encode(new)).encoded, to: second.socket)
        try await eventually("the new process's exit") { delivered.withLockedValue { $0.count } >= 2 }
        try await Task.sleep(for: .milliseconds(100))
        #expect(delivered.withLockedValue { $0 }.map(\.exitCode) == [3, 0], "each exit once, the new process's its own")
    }

    /// A daemon's hello: `keyedSignals` if it knows a signal's repeat.
    static func hello(instance: String, keyedSignals: Bool?) -> BridgeHello {
        BridgeHello(bootID: "00000000-0000-0000-0000-000000000000", processes: [], exits: [], instanceID: instance, keyedSignals: keyedSignals)
    }

    /// A signal whose reply was lost is sent again on the next connection with the same key
    /// (the guest answers a repeat without signalling again: `SignalOnceTests`).
    @Test func aSignalWhoseReplyIsLostIsSentAgainWithTheSameKey() async throws {
        let (directory, bridge) = try Self.startBridge()
        defer {
            bridge.close()
            directory.remove()
        }
        let address = bridge.address
        let signalled = Task { try await bridge.signal("job", SIGTERM, timeout: .seconds(60)) }
        let daemon = Self.hello(instance: "daemon-1", keyedSignals: true)
        let first = try await ScriptedGuest.connect(address, key: Self.key, hello: daemon)
        let (_, original) = try await first.next(.signal, SignalRequest.self)
        let key = try #require(original.idempotencyKey, "the library names every signal")
        #expect(key.utf8.count == 32)
        first.socket.close()

        let second = try await ScriptedGuest.connect(address, key: Self.key, hello: daemon)
        defer { second.socket.close() }
        let (frame, repeated) = try await second.next(.signal, SignalRequest.self)
        #expect(repeated == original, "the very same signal, key included")
        try await second.reply(to: frame, [String: String]())
        try await signalled.value
        #expect(bridge.repeatedSignals == 1)
        #expect(bridge.repeatedCreates == 0)
    }

    /// A signal's repeat goes only to the daemon that got the first, and one that knows a
    /// repeat: to an older daemon (no `keyedSignals`) or one that restarted (another instance),
    /// it would be a second signal. The call ends `bridge-lost`, and nothing is sent again.
    @Test(arguments: [
        (first: ("daemon-1", Bool?.none), next: ("daemon-1", Bool?.none)),
        (first: ("daemon-1", true), next: ("daemon-2", true)),
    ])
    func aSignalIsNotSentAgainToADaemonThatCannotTellARepeat(first: (String, Bool?), next: (String, Bool?)) async throws {
        let (directory, bridge) = try Self.startBridge()
        defer {
            bridge.close()
            directory.remove()
        }
        let address = bridge.address
        let signalled = Task { () -> HoldfastError? in
            do throws(HoldfastError) {
                try await bridge.signal("job", SIGTERM, timeout: .seconds(60))
                return nil
            } catch {
                return error
            }
        }
        let lost = try await ScriptedGuest.connect(address, key: Self.key, hello: Self.hello(instance: first.0, keyedSignals: first.1))
        _ = try await lost.next(.signal, SignalRequest.self)
        lost.socket.close()
        let other = try await ScriptedGuest.connect(address, key: Self.key, hello: Self.hello(instance: next.0, keyedSignals: next.1))
        defer { other.socket.close() }
        let error = try #require(await signalled.value, "the signal succeeded without an answer")
        #expect(error.code == .bridgeLost && error.message.contains("not sent again"), "\(error)")
        #expect(bridge.repeatedSignals == 0)
        // Nothing came on the next connection: a list is the next frame it reads.
        let listed = Task { try? await bridge.list(timeout: .seconds(30)) }
        let (frame, _) = try await other.next(.list, [String: String].self)
        try await other.reply(to: frame, BridgeListResponse(processes: [], streams: []))
        _ = await listed.value
    }
}
