import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// The host end of the bridge (docs/PROTOCOL.md, "Bridge"): accepts the guest's bridge
/// connections — any number over time, the newest replacing the last — and offers the guest's
/// requests as async calls and its exits as an async sequence.
///
/// Exits are delivered exactly once to `exits`: an exit the guest repeats (in a hello after a
/// reconnect, because our acknowledgement was lost with the connection) is acknowledged again
/// but not delivered again. Requests made while no guest is connected wait for one (bounded).
public final class BridgeServer: Sendable {
    public let address: SocketAddress
    /// Every guest hello, in order (boot id, live processes, pending exits).
    public let hellos: AsyncStream<BridgeHello>
    /// Each process exit, once.
    public let exits: AsyncStream<ExitReport>

    private let listener: Listener
    private let helloSink: AsyncStream<BridgeHello>.Continuation
    private let exitSink: AsyncStream<ExitReport>.Continuation
    private let state = NIOLockedValueBox(State())
    private let handshakeTimeout: Duration

    private struct State {
        var connection: Connection?
        var waitingForGuest: [UInt64: CheckedContinuation<Connection?, Never>] = [:]
        var nextWaiter: UInt64 = 0
        var deliveredExits: Set<String> = []
        var refusing = false
        var closed = false
        var accepted = 0
        var lastHello: BridgeHello?
        var repeatedCreates = 0
    }

    /// One guest connection: its writer and the requests waiting for a reply on it.
    final class Connection: Sendable {
        let socket: AsyncFD
        let writer: ControlFrameWriter<AsyncFD>
        let pending = NIOLockedValueBox<(next: UInt64, waiting: [UInt64: CheckedContinuation<ControlFrame?, Never>], closed: Bool)>(
            (0, [:], false))

        init(_ socket: AsyncFD) {
            self.socket = socket
            self.writer = ControlFrameWriter(socket)
        }

        /// Sends a request and waits for its reply; nil if the connection ends first.
        func request(_ type: BridgeMessageType, body: [UInt8]) async -> ControlFrame? {
            await withCheckedContinuation { continuation in
                let id = pending.withLockedValue { p -> UInt64? in
                    guard !p.closed else { return nil }
                    p.next &+= 1
                    p.waiting[p.next] = continuation
                    return p.next
                }
                guard let id else {
                    continuation.resume(returning: nil)
                    return
                }
                writer.send(ControlFrame(type: type.rawValue, id: id, body: body))
            }
        }

        func reply(_ frame: ControlFrame) -> Bool {
            guard let waiter = pending.withLockedValue({ $0.waiting.removeValue(forKey: frame.id) }) else { return false }
            waiter.resume(returning: frame)
            return true
        }

        func close() {
            let waiters = pending.withLockedValue { p -> [CheckedContinuation<ControlFrame?, Never>] in
                p.closed = true
                defer { p.waiting.removeAll() }
                return Array(p.waiting.values)
            }
            writer.finish()
            socket.close()
            for waiter in waiters { waiter.resume(returning: nil) }
        }
    }

    public init(listeningOn address: SocketAddress, unixMode: mode_t? = nil, handshakeTimeout: Duration = .seconds(5)) throws {
        self.address = address
        self.handshakeTimeout = handshakeTimeout
        listener = try Listener(binding: address, unixMode: unixMode)
        (hellos, helloSink) = AsyncStream<BridgeHello>.makeStream()
        (exits, exitSink) = AsyncStream<ExitReport>.makeStream()
    }

    /// The address actually bound (a TCP port 0 becomes the port the kernel chose).
    public var boundAddress: SocketAddress { listener.boundAddress }

    public func start() {
        Task { [self] in
            while let socket = try? await listener.accept() {
                // While refusing (a blackout) a new connection is held, unread, until the
                // blackout ends — like a host that is not there yet: the guest waits for it
                // instead of seeing a connection that opens and dies again and again.
                while state.withLockedValue({ $0.refusing && !$0.closed }) {
                    try? await Task.sleep(for: .milliseconds(10))
                }
                if state.withLockedValue({ $0.closed }) {
                    socket.close()
                    continue
                }
                Task { await serve(socket) }
            }
        }
    }

    // MARK: Requests

    /// Creates a process in the guest; returns its pid there. Exactly once, across bridge
    /// drops: the create carries an idempotency key (a random one unless the spec names its
    /// own), and when the bridge is lost before the reply it is sent again on the next
    /// connection, until `timeout` — the guest answers a repeat with the first one's pid
    /// instead of starting the program again (docs/PROTOCOL.md, "Repeating a create").
    public func create(_ spec: ProcessSpec, timeout: Duration = .seconds(30)) async throws(ErrorBody) -> Int32 {
        var keyed = spec
        if keyed.idempotencyKey == nil { keyed.idempotencyKey = RandomIdentifier.make() }
        // The id may be reused once its last exit was acknowledged: its next exit is news.
        // (Before the first attempt: an exit of this very create may arrive before a repeat's
        // reply, and must then not be delivered twice.)
        state.withLockedValue { _ = $0.deliveredExits.remove(spec.id) }
        let deadline = ContinuousClock.now + timeout
        while true {
            do {
                return try await call(.create, keyed, reply: LaunchResponse.self, timeout: max(.zero, deadline - ContinuousClock.now)).pid
            } catch {
                guard error.code == "bridge-lost", ContinuousClock.now < deadline else { throw error }
                state.withLockedValue { $0.repeatedCreates += 1 }
            }
        }
    }

    public func signal(_ id: String, _ signal: Int32, timeout: Duration = .seconds(10)) async throws(ErrorBody) {
        _ = try await call(.signal, SignalRequest(id: id, signal: signal), reply: [String: String].self, timeout: timeout)
    }

    public func resize(_ id: String, rows: UInt16, columns: UInt16, timeout: Duration = .seconds(10)) async throws(ErrorBody) {
        _ = try await call(.resize, ProcessResizeRequest(id: id, rows: rows, columns: columns), reply: [String: String].self, timeout: timeout)
    }

    public func closeStdin(_ id: String, timeout: Duration = .seconds(10)) async throws(ErrorBody) {
        _ = try await call(.closeStdin, ProcessIDRequest(id: id), reply: [String: String].self, timeout: timeout)
    }

    public func list(timeout: Duration = .seconds(10)) async throws(ErrorBody) -> BridgeListResponse {
        try await call(.list, [String: String](), reply: BridgeListResponse.self, timeout: timeout)
    }

    public func stats(timeout: Duration = .seconds(10)) async throws(ErrorBody) -> BrokerStats {
        try await call(.stats, [String: String](), reply: BrokerStats.self, timeout: timeout)
    }

    /// Sends any request and decodes the reply. Waits up to `timeout` for a guest to be connected;
    /// a connection lost before the reply is the error `bridge-lost` (the request may or may not
    /// have been carried out; `create` handles that itself by sending its keyed request again).
    public func call<Request: Encodable, Reply: Decodable>(
        _ type: BridgeMessageType, _ request: Request, reply: Reply.Type, timeout: Duration
    ) async throws(ErrorBody) -> Reply {
        guard let connection = await guest(within: timeout) else {
            throw ErrorBody(code: "no-guest", message: "no guest connected to the bridge at \(address) within \(timeout)")
        }
        guard let frame = await connection.request(type, body: ControlJSON.encode(request)) else {
            throw ErrorBody(code: "bridge-lost", message: "the bridge connection was lost before the guest replied")
        }
        if frame.type == BridgeMessageType.error.rawValue {
            throw (try? ControlJSON.decode(ErrorBody.self, from: frame.body, frameType: frame.type))
                ?? ErrorBody(code: "error", message: String(decoding: frame.body, as: UTF8.self))
        }
        do {
            return try ControlJSON.decode(Reply.self, from: frame.body, frameType: frame.type)
        } catch {
            throw ErrorBody(code: "bad-reply", message: error.description)
        }
    }

    // MARK: Inspection and faults

    public var isConnected: Bool { state.withLockedValue { $0.connection != nil } }
    public var acceptedConnections: Int { state.withLockedValue { $0.accepted } }
    public var lastHello: BridgeHello? { state.withLockedValue { $0.lastHello } }
    /// Creates sent again because the bridge was lost before their reply.
    public var repeatedCreates: Int { state.withLockedValue { $0.repeatedCreates } }

    /// Waits (bounded) until a guest has said hello.
    public func waitForGuest(timeout: Duration) async -> Bool {
        await guest(within: timeout) != nil
    }

    /// Drops the current connection (a migration, a host agent restart); with `refusing`, new
    /// connections are closed at once until it is called again with `false`.
    public func drop(refusing: Bool) {
        let connection = state.withLockedValue { s -> Connection? in
            s.refusing = refusing
            defer { s.connection = nil }
            return s.connection
        }
        connection?.close()
    }

    public func close() {
        let (connection, waiters) = state.withLockedValue { s -> (Connection?, [CheckedContinuation<Connection?, Never>]) in
            s.closed = true
            s.refusing = true
            defer {
                s.connection = nil
                s.waitingForGuest.removeAll()
            }
            return (s.connection, Array(s.waitingForGuest.values))
        }
        listener.close()
        connection?.close()
        for waiter in waiters { waiter.resume(returning: nil) }
        helloSink.finish()
        exitSink.finish()
    }

    // MARK: Internals

    private func guest(within timeout: Duration) async -> Connection? {
        if let connection = state.withLockedValue({ $0.connection }) { return connection }
        let id = state.withLockedValue { s -> UInt64 in
            s.nextWaiter &+= 1
            return s.nextWaiter
        }
        let timer = Task { [self] in
            try? await Task.sleep(for: timeout)
            state.withLockedValue { $0.waitingForGuest.removeValue(forKey: id) }?.resume(returning: nil)
        }
        defer { timer.cancel() }
        return await withCheckedContinuation { continuation in
            let ready = state.withLockedValue { s -> Connection?? in
                if let connection = s.connection { return .some(connection) }
                if s.closed { return .some(nil) }
                s.waitingForGuest[id] = continuation
                return .none
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    /// One guest connection: the hello first (bounded), then replies and exits until it ends.
    private func serve(_ socket: AsyncFD) async {
        let first: ControlFrame
        do {
            first = try await withHandshakeTimeout(socket) {
                try await ControlFrameIO.read(from: socket, maxBody: BridgeProtocol.maxBody)
            }
        } catch {
            socket.close()
            return
        }
        guard first.type == BridgeMessageType.hello.rawValue,
            let hello = try? ControlJSON.decode(BridgeHello.self, from: first.body, frameType: first.type)
        else {
            socket.close()
            return
        }
        let connection = Connection(socket)
        let (previous, waiters) = state.withLockedValue { s -> (Connection?, [CheckedContinuation<Connection?, Never>]) in
            let previous = s.connection
            s.connection = connection
            s.accepted += 1
            s.lastHello = hello
            defer { s.waitingForGuest.removeAll() }
            return (previous, Array(s.waitingForGuest.values))
        }
        previous?.close()
        helloSink.yield(hello)
        for report in hello.exits { deliver(report, on: connection) }
        for waiter in waiters { waiter.resume(returning: connection) }

        while true {
            guard let frame = try? await ControlFrameIO.read(from: socket, maxBody: BridgeProtocol.maxBody) else { break }
            switch BridgeMessageType(rawValue: frame.type) {
            case .ok, .error:
                _ = connection.reply(frame)  // a reply to nothing we asked is ignored
            case .exit:
                if let report = try? ControlJSON.decode(ExitReport.self, from: frame.body, frameType: frame.type) {
                    deliver(report, on: connection)
                }
            default:
                break
            }
        }
        state.withLockedValue { if $0.connection === connection { $0.connection = nil } }
        connection.close()
    }

    /// Delivers an exit once, and acknowledges it every time the guest reports it.
    private func deliver(_ report: ExitReport, on connection: Connection) {
        let first = state.withLockedValue { $0.deliveredExits.insert(report.id).inserted }
        if first { exitSink.yield(report) }
        let body = ControlJSON.encode(AcknowledgeExitRequest(id: report.id))
        Task { _ = await connection.request(.acknowledgeExit, body: body) }
    }

    private func withHandshakeTimeout<T: Sendable>(_ socket: AsyncFD, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
        let timer = Task { [handshakeTimeout] in
            try await Task.sleep(for: handshakeTimeout)
            socket.close()
        }
        defer { timer.cancel() }
        return try await body()
    }
}
