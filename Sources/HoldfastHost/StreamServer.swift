import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// The host end of resumable streams: one listener that accepts any number of connections —
/// never accept-once — reads each one's hello, and hands it to the stream its token names.
///
/// Every stream survives any number of reconnections: a new connection for a token replaces the
/// old one, and the stream replays from what the guest reports. A connection that does not say
/// a valid hello within `handshakeTimeout`, names an unknown token, or reports impossible
/// offsets is refused with an ERROR frame and closed; nothing else is affected.
///
/// Generic over the transport so tests can wrap accepted sockets with fault injection.
public final class StreamServer<Transport: ByteConnection>: Sendable {
    public typealias Stream = ResumableStream<Transport>

    public let address: SocketAddress
    public let handshakeTimeout: Duration
    /// Connections still saying hello at once; one more closes the oldest of them: a flood of
    /// silent peers holds at most this many fds, each for at most `handshakeTimeout`, and never
    /// keeps a stream out. (It closed the newcomer instead: a guest process holding this many
    /// silent connections, 820 new ones a second, turned away every redial of every stream.)
    /// A connection whose hello is already there when it is accepted, and proves it holds an
    /// open stream's secret, waits apart (as many again), where connections without one never
    /// push it out: a flood the host accepts as fast as it comes would otherwise push out a
    /// real hello before the connection's own task had read it.
    public let maxConcurrentHandshakes: Int
    private let listener: Listener
    private let wrap: @Sendable (AsyncFD) -> Transport
    private let state = NIOLockedValueBox(State())

    private struct State: Sendable {
        var streams: [[UInt8]: Stream] = [:]
        var acceptTask: Task<Void, Never>?
        var accepted: UInt64 = 0
        var refused: UInt64 = 0
        /// Why the last connection that said hello was refused.
        var lastRefusal: String?
        var acceptErrors: UInt64 = 0
        var refusing = false
        /// Connections saying hello, by the order they came in: those whose hello proved itself
        /// as they were accepted, and the others.
        var handshakes = PendingHandshakes()
        var provenHandshakes = PendingHandshakes()
        var nextHandshake: UInt64 = 0
        var provenEarly: UInt64 = 0
        var handshaking: Int { handshakes.count + provenHandshakes.count }

        /// Takes `ticket` out of whichever group it waits in; false if it waits in none (pushed
        /// out meanwhile).
        mutating func removeHandshake(_ ticket: UInt64) -> Bool {
            handshakes.remove(ticket) || provenHandshakes.remove(ticket)
        }
    }

    /// Connections in their handshake, by ticket.
    struct PendingHandshakes: Sendable {
        private var connections: [UInt64: AsyncFD] = [:]
        /// No connection here came before this one (tickets only grow, so finding the oldest
        /// walks forward from here: constant time per connection, amortised, where a scan of up
        /// to `maxConcurrentHandshakes` at every accept of a flood would not be).
        private var oldest: UInt64 = 1
        var count: Int { connections.count }

        /// Adds a connection; past `limit`, takes the oldest out and returns it, to be pushed
        /// out. `ticket` may be older than every one here (a connection moved from the other
        /// group).
        mutating func add(_ ticket: UInt64, _ socket: AsyncFD, limit: Int) -> (UInt64, AsyncFD)? {
            connections[ticket] = socket
            oldest = min(oldest, ticket)
            guard connections.count > limit else { return nil }
            while connections[oldest] == nil { oldest += 1 }
            return connections.removeValue(forKey: oldest).map { (oldest, $0) }
        }
        mutating func remove(_ ticket: UInt64) -> Bool { connections.removeValue(forKey: ticket) != nil }
    }

    /// Binds now (so the address is known, and a bad one fails here); call `start()` to accept.
    /// - Parameter unixMode: for a Unix socket, its file mode (a guest-side broker running as
    ///   an unprivileged user needs write permission on a development socket).
    public init(
        listeningOn address: SocketAddress, handshakeTimeout: Duration = .seconds(5), unixMode: mode_t? = nil,
        maxConcurrentHandshakes: Int = 4096, wrap: @escaping @Sendable (AsyncFD) -> Transport
    ) throws {
        self.listener = try Listener(binding: address, unixMode: unixMode)
        self.address = listener.boundAddress
        self.handshakeTimeout = handshakeTimeout
        self.maxConcurrentHandshakes = maxConcurrentHandshakes
        self.wrap = wrap
    }

    public func start() {
        let task = Task { [self] in
            while !Task.isCancelled {
                // Out of fds or memory for a moment (EMFILE, ENFILE, ENOBUFS) is counted and
                // retried: the listener outlives it.
                guard let socket = await listener.nextConnection(failed: { _ in state.withLockedValue { $0.acceptErrors &+= 1 } }) else {
                    return  // closed
                }
                // Admitted here, in accept order: "the oldest" a flood pushes out is the one that
                // came first. A guest's hello follows its connect at once, so it is usually
                // here already: one that proves itself waits apart, out of a flood's reach.
                let proven = provesItself(socket)
                let (ticket, pushedOut) = state.withLockedValue { s -> (UInt64?, (UInt64, AsyncFD)?) in
                    s.accepted &+= 1
                    if s.refusing { return (nil, nil) }
                    s.nextHandshake &+= 1
                    if proven {
                        s.provenEarly &+= 1
                        return (s.nextHandshake, s.provenHandshakes.add(s.nextHandshake, socket, limit: maxConcurrentHandshakes))
                    }
                    return (s.nextHandshake, s.handshakes.add(s.nextHandshake, socket, limit: maxConcurrentHandshakes))
                }
                if let (oldTicket, oldest) = pushedOut { pushOut(oldest, ticket: oldTicket, proven: proven) }
                guard let ticket else {
                    socket.close()  // a blackout (as if nobody listened)
                    continue
                }
                Task { await handshake(wrap(socket), ticket: ticket) }
            }
        }
        state.withLockedValue { $0.acceptTask = task }
    }

    /// Whether the hello waiting on `socket` (a peek: it stays for the handshake to read) proves
    /// it holds an open stream's secret. The proof is checked outside the lock: a flood of
    /// hellos naming a real token costs the accept loop an HMAC each, not every other user of
    /// the state.
    private func provesItself(_ socket: AsyncFD) -> Bool {
        guard let hello = Handshake.hello(atStartOf: socket.peekNow(upTo: StreamFramePrefix.size + StreamFramePrefix.maxHelloBody)),
            let secret = state.withLockedValue({ $0.streams[hello.token]?.secret })
        else { return false }
        return StreamAuthentication.verify(hello, secret: secret)
    }

    /// Closes the oldest connection of a full group (already out of it). One from the others is
    /// looked at first: its hello may have come since it was accepted, and one that proves
    /// itself now joins those waiting apart instead (the others are back at their limit
    /// without it) — so a real stream's connection accepted a moment before its hello arrived
    /// has the group's whole turnover for it to come, not nothing.
    private func pushOut(_ socket: AsyncFD, ticket: UInt64, proven: Bool) {
        if !proven, provesItself(socket) {
            let next = state.withLockedValue { s -> (UInt64, AsyncFD)? in
                s.provenEarly &+= 1
                return s.provenHandshakes.add(ticket, socket, limit: maxConcurrentHandshakes)
            }
            if let (nextTicket, next) = next { pushOut(next, ticket: nextTicket, proven: true) }
            return
        }
        state.withLockedValue { $0.refused &+= 1 }
        socket.close()
    }

    /// Creates a host stream for `token` and registers it. For a guest's stdout/stderr use
    /// `.receive`; for its stdin `.send`. The stream gets a new random secret unless one is
    /// given: put `stream.streamSpec(at:)` (token and secret) in the create request, so that
    /// the broker, and nobody else, can connect for it.
    ///
    /// A token already open here is refused (`tokenInUse`): two streams behind one token would
    /// take each other's connections and splice their bytes together.
    ///
    /// `resumeAt`: this host end restarted — the application that held the stream before died
    /// or was restarted. Open the stream again with the same token and secret.
    /// - A `.receive` stream: its consumer already holds the stream's first `resumeAt` bytes
    ///   (what it had written to its file, say). The guest, which keeps every byte the host did
    ///   not acknowledge, goes on from there, so nothing is lost and nothing repeats — provided
    ///   the stream acknowledged only what the consumer had kept, in the earlier life too
    ///   (`configuration.acknowledgeDelivered`, and `delivered(_:)` once bytes are kept;
    ///   `Relay.input` does both). Bytes acknowledged and then not kept are a gap the guest
    ///   reports (`lost`); an offset beyond what the guest ever sent is refused on every
    ///   connection.
    /// - A `.send` stream (a stdin): `resumeAt` is how many bytes the earlier life had handed to
    ///   `send`, counted before each hand-over (so it is never below what the guest received).
    ///   What the earlier life had sent and the guest had not received died with it: the guest
    ///   and this end count those offsets as lost (a GAP), and the stream goes on from
    ///   `resumeAt` — nothing repeats, and the process's stdin stays open for what comes next.
    ///
    /// docs/PROTOCOL.md, "A host that restarted".
    public func open(
        token: [UInt8], direction: StreamDirection, secret: StreamSecret = .random(),
        configuration: ResumableConfiguration = ResumableConfiguration(), resumeAt: UInt64? = nil,
        observer: (@Sendable (SlotEvent) -> Void)? = nil
    ) throws(StreamServerError) -> Stream {
        guard !token.isEmpty, token.count <= StreamHello.maxTokenLength else { throw .badToken(token.count) }
        let stream = Stream(
            token: token, secret: secret, role: .host, direction: direction, configuration: configuration,
            executor: Reactor.shared, resumeAt: resumeAt, observer: observer)
        let taken = state.withLockedValue { s -> Bool in
            if s.streams[token] != nil { return true }
            s.streams[token] = stream
            return false
        }
        if taken {
            stream.close()
            throw .tokenInUse(String(decoding: token, as: UTF8.self))
        }
        return stream
    }

    /// The open stream `token` names, if any.
    public func stream(for token: [UInt8]) -> Stream? {
        state.withLockedValue { $0.streams[token] }
    }

    /// Forgets a stream (its token is refused from now on) and closes it.
    public func close(token: [UInt8]) {
        state.withLockedValue { $0.streams.removeValue(forKey: token) }?.close()
    }

    /// Closes `stream` and forgets it — unless its token was opened again since, for a newer
    /// stream, which stays. Every stream opened must end here (or in `close(token:)`): the
    /// server holds each one, and its connection, until then.
    public func close(_ stream: Stream) {
        state.withLockedValue { s in
            if s.streams[stream.token] === stream { s.streams.removeValue(forKey: stream.token) }
        }
        stream.close()
    }

    public var statistics: (accepted: UInt64, refused: UInt64, acceptErrors: UInt64, handshaking: Int, streams: Int) {
        state.withLockedValue { ($0.accepted, $0.refused, $0.acceptErrors, $0.handshaking, $0.streams.count) }
    }

    /// Why the last connection that said hello (or failed to) was refused, if one was: for a tool
    /// to say why nothing arrives.
    public var lastRefusal: String? { state.withLockedValue { $0.lastRefusal } }

    /// Connections whose hello proved itself before their handshake read it: as they were
    /// accepted, or as they were about to be pushed out.
    public var provenEarly: UInt64 { state.withLockedValue { $0.provenEarly } }

    /// While refusing, every new connection is closed at once (a blackout: the host is away).
    public func setRefusing(_ refusing: Bool) {
        state.withLockedValue { $0.refusing = refusing }
    }

    /// Drops every stream's current connection at once (what a live migration looks like).
    /// Drops every stream's connection (a migration); returns how many were connected.
    @discardableResult
    public func dropAllConnections() -> Int {
        var connected = 0
        for stream in state.withLockedValue({ Array($0.streams.values) }) {
            if stream.slot.phase == .connected { connected += 1 }
            stream.slot.disconnect()
        }
        return connected
    }

    public func close() {
        let (task, streams) = state.withLockedValue { s -> (Task<Void, Never>?, [Stream]) in
            defer { s.streams.removeAll() }
            return (s.acceptTask, Array(s.streams.values))
        }
        task?.cancel()
        listener.close()
        for stream in streams { stream.close() }
    }

    private func handshake(_ transport: Transport, ticket: UInt64) async {
        // Still listed unless pushed out (then already counted refused, and closed).
        let stillListed = { [state] in state.withLockedValue { $0.removeHandshake(ticket) } }
        let hello: StreamHello
        do {
            hello = try await readHelloWithin(handshakeTimeout, transport)
        } catch {
            let problem = error as? StreamProtocolError ?? .truncated
            if stillListed() {
                state.withLockedValue {
                    $0.refused &+= 1
                    $0.lastRefusal = "no valid hello (\(problem))"
                }
            }
            await Handshake.refuse(transport, problem)
            return
        }
        // Said hello: no longer among those a flood pushes out (and if it was just now, its
        // connection is closed: the guest redials).
        guard stillListed() else { return }
        // A stream the application closed, or that gave up (its drain timeout), is one the host
        // no longer has, though its token may still be registered: refused as unknown. Accepted,
        // its closed slot would drop the connection at once, and the guest — whose dial had
        // succeeded — would dial again at once, without end.
        guard let stream = state.withLockedValue({ $0.streams[hello.token] }), !stream.isClosed else {
            state.withLockedValue {
                $0.refused &+= 1
                $0.lastRefusal = "a hello for a stream this end does not have (another token, or another secret)"
            }
            // The same work and the same refusal as a hello whose proof is wrong: a peer cannot
            // tell which tokens exist.
            StreamAuthentication.verifyNothing(hello)
            await Handshake.refuse(transport, .wrongToken)
            return
        }
        do {
            try await stream.accept(transport, hello: hello)
        } catch {
            state.withLockedValue {
                $0.refused &+= 1
                $0.lastRefusal = "\(error)"
            }
        }
    }

    /// Reads the hello, closing the transport if it does not arrive in time (a peer that
    /// connects and says nothing must not hold a slot forever).
    /// (The timer is the shared wheel's: a cancelled `Task.sleep` would keep its timer, and
    /// the memory behind it, for the whole timeout — one per connection accepted.)
    private func readHelloWithin(_ timeout: Duration, _ transport: Transport) async throws -> StreamHello {
        let timedOut = NIOLockedValueBox(false)
        let timer = TimeoutWheel.shared.schedule(after: timeout) {
            timedOut.withLockedValue { $0 = true }
            transport.close()
        }
        defer { TimeoutWheel.shared.cancel(timer) }
        do {
            return try await Handshake.readHello(from: transport)
        } catch {
            if timedOut.withLockedValue({ $0 }) { throw StreamProtocolError.handshakeTimedOut }
            throw error
        }
    }
}

extension StreamServer where Transport == AsyncFD {
    public convenience init(
        listeningOn address: SocketAddress, handshakeTimeout: Duration = .seconds(5), unixMode: mode_t? = nil,
        maxConcurrentHandshakes: Int = 4096
    ) throws {
        try self.init(
            listeningOn: address, handshakeTimeout: handshakeTimeout, unixMode: unixMode,
            maxConcurrentHandshakes: maxConcurrentHandshakes, wrap: { $0 })
    }
}

/// Why `StreamServer.open` refused a stream.
public enum StreamServerError: Error, Sendable, Equatable, CustomStringConvertible {
    /// A stream with this token is open here.
    case tokenInUse(String)
    /// A token must be 1 to 256 bytes.
    case badToken(Int)

    public var description: String {
        switch self {
        case .tokenInUse(let token): return "token '\(token)' is in use by another open stream"
        case .badToken(let length): return "a token must be 1 to \(StreamHello.maxTokenLength) bytes, not \(length)"
        }
    }
}

extension ResumableStream {
    /// What a create request says about this (host) stream: the address the guest dials, the
    /// token and the secret.
    public func streamSpec(at address: String) -> StreamSpec {
        StreamSpec(address: address, mode: .resumable, token: String(decoding: token, as: UTF8.self), secret: secret)
    }
}
