import Glibc
import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
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
