import HoldfastProtocol
import NIOConcurrencyHelpers

/// A connection that carries control frames: a SOCK_SEQPACKET channel (one frame per message,
/// fds by SCM_RIGHTS; `SeqpacketFrames` in HoldfastPosix) or a byte stream (the bridge;
/// `StreamFrames`). The one RPC server and the one client below run on either.
public protocol FrameTransport: Sendable {
    /// The next frame and the fds that came with it (the caller owns them).
    func receive() async throws(FrameTransportError) -> (frame: ControlFrame, descriptors: [Int32])
    /// Sends a frame (with fds, where the transport carries them) and returns once it is written.
    func send(_ frame: ControlFrame, descriptors: [Int32]) async throws(FrameTransportError)
    func close()
    /// Sends nothing more, and lets the peer read the end, while what it sent is still read (a
    /// peer that died: its last messages; a live one: it ends its side once it reads the end).
    func stopSending()
}

extension FrameTransport {
    /// Where the transport cannot end one direction alone: closed.
    public func stopSending() { close() }
}

/// Why a transport gave no frame.
public enum FrameTransportError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The peer closed the connection between frames.
    case ended
    /// The connection broke, or framing was lost (a frame cut short, a datagram that is not a
    /// frame): nothing more can be read from it.
    case broken(String)
    /// A frame announced a body over the limit; `id` is its id, for the refusal.
    case oversized(id: UInt64, String)
    /// `frame` arrived but not all its fds did (the receiver is at its limit on open files):
    /// a request is refused, a notification is delivered without them (its handler checks for
    /// what it needs and says no); the connection goes on.
    case refused(ControlFrame, HoldfastError)

    public var description: String {
        switch self {
        case .ended: return "end of stream"
        case .broken(let why): return why
        case .oversized(_, let why): return why
        case .refused(_, let error): return error.description
        }
    }
}

/// Control frames over a byte stream: `ControlFrameIO` in, one `ControlFrameWriter` out.
public final class StreamFrames<Connection: ByteConnection>: FrameTransport {
    public let connection: Connection
    public let writer: ControlFrameWriter<Connection>
    private let maxBody: Int

    public init(_ connection: Connection, maxBody: Int) {
        self.connection = connection
        self.writer = ControlFrameWriter(connection)
        self.maxBody = maxBody
    }

    public func receive() async throws(FrameTransportError) -> (frame: ControlFrame, descriptors: [Int32]) {
        do {
            return (try await ControlFrameIO.read(from: connection, maxBody: maxBody), [])
        } catch let error as ControlFrameIO.ReadError {
            switch error {
            case .endOfStream: throw .ended
            case .truncated: throw .broken(error.description)
            case .oversized(_, _, let id): throw .oversized(id: id, error.description)
            }
        } catch {
            throw .broken("\(error)")
        }
    }

    /// Queued in order behind the frames before it; returns once written (or dropped with the
    /// connection: a byte stream cannot carry fds, so any given are an error).
    public func send(_ frame: ControlFrame, descriptors: [Int32]) async throws(FrameTransportError) {
        guard descriptors.isEmpty else { throw .broken("a byte stream carries no fds") }
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            writer.send(frame, whenWritten: { continuation.resume() })
        }
    }

    /// Queues a frame without waiting for it to be written.
    public func post(_ frame: ControlFrame) {
        writer.send(frame)
    }

    public func close() {
        writer.finish()
        connection.close()
    }
}

/// How a served connection ended.
public enum RPCServerEnd: Sendable, Equatable, CustomStringConvertible {
    /// The peer closed it.
    case closedByPeer
    /// Framing was lost or the connection broke; the reason (and, for an oversized frame, the
    /// refusal the peer was sent).
    case broken(String)

    public var description: String {
        switch self {
        case .closedByPeer: return "closed by the peer"
        case .broken(let why): return why
        }
    }
}

/// The one request loop of every control protocol: reads frames, decodes each request once
/// (`Request.decode`), runs its handler on a task of its own (a slow `create` must not hold up
/// a `signal`) with at most `inFlight` at a time, and answers with the request's id: `ok` with
/// the handler's reply, or `error` with the `HoldfastError` it threw (a request that does not
/// decode is answered the same way, and the connection stays). A request holds its permit
/// until its reply is written, so a peer that sends faster than it reads the replies stops
/// being read: back-pressure, not memory.
public enum RPCServer {
    public typealias Handler<Request: RPCRequest> = @Sendable (_ request: Request, _ descriptors: [Int32]) async throws(HoldfastError) -> RPCReply

    /// Serves `transport` until the peer closes it or framing is lost; returns why. Frames with
    /// id 0 are notifications, handed to `notification` in order (the next frame is read after
    /// it returns); replies (`ok`, `error`) sent to a server are stray and go to `stray`.
    /// `closeDescriptors` closes fds a refused request brought. Handlers still running when the
    /// connection ends are cancelled if `cancelWhenClosed` (a client's waits go with it), and
    /// are otherwise left to finish (their replies go nowhere). `unanswered`, when given, counts
    /// each request from its arrival to its reply's write (or failed write).
    public static func serve<Request: RPCRequest>(
        _ transport: some FrameTransport, as _: Request.Type, inFlight: Int, cancelWhenClosed: Bool = false,
        unanswered: UnansweredRequests? = nil,
        notification: @escaping @Sendable (ControlFrame) async -> Void = { _ in },
        stray: @escaping @Sendable (ControlFrame) -> Void = { _ in },
        closeDescriptors: @escaping @Sendable ([Int32]) -> Void,
        handle: @escaping Handler<Request>
    ) async -> RPCServerEnd {
        let limit = RequestLimit(capacity: inFlight)
        // Handlers still running (to cancel them at the end); one that ends before it is filed
        // leaves its key in `finished` instead.
        let running = NIOLockedValueBox<(next: UInt64, tasks: [UInt64: Task<Void, Never>], finished: Set<UInt64>)>((0, [:], []))
        defer {
            if cancelWhenClosed {
                for task in running.withLockedValue({ Array($0.tasks.values) }) { task.cancel() }
            }
        }
        while true {
            await limit.acquire()
            let frame: ControlFrame
            let descriptors: [Int32]
            do {
                (frame, descriptors) = try await transport.receive()
            } catch {
                limit.release()
                switch error {
                case .ended: return .closedByPeer
                case .broken(let why):
                    // Best effort: on a message socket the peer can still read why.
                    try? await transport.send(ControlFrame(type: RPCFrameType.error, id: 0, body: HoldfastError(.badFrame, why).errorFrameBody), descriptors: [])
                    return .broken(why)
                case .oversized(let id, let why):
                    // Say why before the connection goes: the peer can log it.
                    try? await transport.send(
                        ControlFrame(type: RPCFrameType.error, id: id, body: HoldfastError(.frameTooLarge, why).errorFrameBody), descriptors: [])
                    return .broken(why)
                case .refused(let frame, let refusal):
                    // That request only: the next one may fit. (No notification sent here
                    // carries fds.)
                    if frame.id != 0 {
                        try? await transport.send(ControlFrame(type: RPCFrameType.error, id: frame.id, body: refusal.errorFrameBody), descriptors: [])
                    }
                    continue
                }
            }
            if frame.id == 0 {
                closeDescriptors(descriptors)
                await notification(frame)
                limit.release()
                continue
            }
            if RPCFrameType.isReply(frame.type) {
                closeDescriptors(descriptors)
                stray(frame)
                limit.release()
                continue
            }
            let key = running.withLockedValue { r -> UInt64 in
                r.next &+= 1
                return r.next
            }
            unanswered?.arrived()
            let task = Task {
                defer {
                    unanswered?.answered()
                    limit.release()
                    running.withLockedValue { r in
                        if r.tasks.removeValue(forKey: key) == nil { r.finished.insert(key) }
                    }
                }
                let reply: ControlFrame
                var sent: [Int32] = []
                var afterSent: RPCReply.AfterSent?
                do throws(HoldfastError) {
                    let request: Request
                    do throws(HoldfastError) {
                        request = try Request.decode(type: frame.type, body: frame.body, descriptorCount: descriptors.count)
                    } catch {
                        closeDescriptors(descriptors)
                        throw error
                    }
                    let answer = try await handle(request, descriptors)
                    // A reply the peer could not read would break its channel: said instead.
                    guard answer.body.count <= ControlFrame.defaultMaxBody else {
                        if let afterSent = answer.afterSent { await afterSent(false) } else { closeDescriptors(answer.descriptors) }
                        throw HoldfastError(
                            .frameTooLarge, "the reply is \(answer.body.count) bytes, more than the \(ControlFrame.defaultMaxBody) a frame may carry")
                    }
                    sent = answer.descriptors
                    afterSent = answer.afterSent
                    reply = ControlFrame(type: RPCFrameType.ok, id: frame.id, body: answer.body)
                } catch {
                    reply = ControlFrame(type: RPCFrameType.error, id: frame.id, body: error.errorFrameBody)
                }
                let delivered: Bool
                do {
                    try await transport.send(reply, descriptors: sent)
                    delivered = true
                } catch {
                    delivered = false
                    // The peer waits for this reply and would wait for ever: the connection ends
                    // instead (its requests fail as closed; a role's channel ending restarts it,
                    // and the restart redoes what was lost).
                    transport.close()
                }
                if let afterSent {
                    await afterSent(delivered)  // the fds are its own
                } else {
                    closeDescriptors(sent)  // the peer has its copies
                }
            }
            running.withLockedValue { r in
                if r.finished.remove(key) == nil { r.tasks[key] = task }
            }
        }
    }
}

/// The one client of every control protocol: sends requests with fresh ids and matches replies
/// to them; `run()` reads until the connection ends, handing frames with id 0 (notifications)
/// to `onNotification` (with the fds attached to them: the handler's to close); then every
/// request still waiting fails with `channel-closed`.
public final class RPCClient: Sendable {
    public let transport: any FrameTransport
    private let state = NIOLockedValueBox(State())
    private let onNotification: @Sendable (ControlFrame, [Int32]) async -> Void
    private let closeDescriptors: @Sendable ([Int32]) -> Void

    private struct State: Sendable {
        var nextID: UInt64 = 0
        var pending: [UInt64: CheckedContinuation<Result<RPCResponse, HoldfastError>, Never>] = [:]
        var closed = false
    }

    /// A reply and the fds that came with it (the caller's).
    public struct RPCResponse: Sendable {
        public var frame: ControlFrame
        public var descriptors: [Int32]
    }

    public init(
        transport: any FrameTransport, closeDescriptors: @escaping @Sendable ([Int32]) -> Void,
        onNotification: @escaping @Sendable (ControlFrame) async -> Void = { _ in }
    ) {
        self.transport = transport
        self.closeDescriptors = closeDescriptors
        self.onNotification = { frame, descriptors in
            closeDescriptors(descriptors)
            await onNotification(frame)
        }
    }

    /// A client whose notifications may carry fds: `onNotification` gets them, and closes them.
    public init(
        transport: any FrameTransport, closeDescriptors: @escaping @Sendable ([Int32]) -> Void,
        onNotificationWithDescriptors: @escaping @Sendable (ControlFrame, [Int32]) async -> Void
    ) {
        self.transport = transport
        self.closeDescriptors = closeDescriptors
        self.onNotification = onNotificationWithDescriptors
    }

    /// Sends a request and waits for its reply; an `error` reply is thrown as its
    /// `HoldfastError`. fds that come with the reply belong to the caller.
    public func request(_ type: UInt32, body: [UInt8], descriptors: [Int32] = []) async throws(HoldfastError) -> RPCResponse {
        let id = state.withLockedValue { s -> UInt64? in
            guard !s.closed else { return nil }
            s.nextID &+= 1
            return s.nextID
        }
        guard let id else { throw HoldfastError(.channelClosed, "the control channel is closed") }
        // Refused here, that request alone: sent, the peer could not read it and its channel
        // broke (every request on it failed with it).
        guard body.count <= ControlFrame.defaultMaxBody else {
            throw HoldfastError(
                .frameTooLarge, "the request is \(body.count) bytes, more than the \(ControlFrame.defaultMaxBody) a frame may carry")
        }
        let result = await withCheckedContinuation { (continuation: CheckedContinuation<Result<RPCResponse, HoldfastError>, Never>) in
            let closed = state.withLockedValue { s -> Bool in
                if s.closed { return true }
                s.pending[id] = continuation
                return false
            }
            if closed {
                continuation.resume(returning: .failure(HoldfastError(.channelClosed, "the control channel is closed")))
                return
            }
            Task {
                do throws(FrameTransportError) {
                    try await transport.send(ControlFrame(type: type, id: id, body: body), descriptors: descriptors)
                } catch {
                    state.withLockedValue { $0.pending.removeValue(forKey: id) }?
                        .resume(returning: .failure(HoldfastError(.channelClosed, error.description, cause: error)))
                    // Said `channel-closed`, so made true: callers take it as the peer gone (a
                    // role's successor redoes the request), which only a channel that ends brings
                    // about. Left open, a supervisor's lost `process-exited` or `bridge-up` was
                    // never sent again and its exit never reported. Ended for sending only: a
                    // peer that died (the usual reason a send fails) may have last messages
                    // unread here — a broker's `handoff-releasing`, written before it answered
                    // a release and died — which closing threw away (a loaded full suite lost
                    // one so: the supervisor's `list` to the dead broker failed first).
                    transport.stopSending()
                }
            }
        }
        return try result.get()
    }

    /// A typed request, its reply decoded.
    public func call<Request: RPCRequest, Reply: Decodable>(
        _ request: Request, descriptors: [Int32] = [], reply: Reply.Type
    ) async throws(HoldfastError) -> Reply {
        try await call(request.frameType, body: request.body, descriptors: descriptors, reply: reply)
    }

    /// A request by frame type and Encodable body, its reply decoded.
    public func call<Body: Encodable, Reply: Decodable>(
        _ type: UInt32, _ body: Body, descriptors: [Int32] = [], reply: Reply.Type
    ) async throws(HoldfastError) -> Reply {
        try await call(type, body: ControlJSON.encode(body), descriptors: descriptors, reply: reply)
    }

    private func call<Reply: Decodable>(
        _ type: UInt32, body: [UInt8], descriptors: [Int32], reply: Reply.Type
    ) async throws(HoldfastError) -> Reply {
        let received = try await request(type, body: body, descriptors: descriptors)
        closeDescriptors(received.descriptors)
        do {
            return try ControlJSON.decode(Reply.self, from: received.frame.body, frameType: received.frame.type)
        } catch {
            throw HoldfastError(.badReply, error.description)
        }
    }

    /// Reads replies and notifications until the connection ends. `beforeFailingPending` runs
    /// once the reader has stopped and before any request still waiting fails: an owner that
    /// hands this client out takes it out of service there, so that a caller told "closed" and
    /// asking again at once is never given it again.
    public func run(beforeFailingPending: () -> Void = {}) async {
        while true {
            let frame: ControlFrame
            let descriptors: [Int32]
            do {
                (frame, descriptors) = try await transport.receive()
            } catch .refused(let frame, let refusal) {
                if frame.id == 0 {
                    // A notification whose fds did not arrive (a deposit): delivered without
                    // them, so that its handler can say it was not kept rather than nothing.
                    await onNotification(frame, [])
                    continue
                }
                // A reply whose fds did not arrive: that request fails, the channel goes on.
                state.withLockedValue { $0.pending.removeValue(forKey: frame.id) }?.resume(returning: .failure(refusal))
                continue
            } catch {
                break
            }
            if frame.id == 0 {
                await onNotification(frame, descriptors)
                continue
            }
            guard let waiter = state.withLockedValue({ $0.pending.removeValue(forKey: frame.id) }) else {
                closeDescriptors(descriptors)  // a reply nobody asked for
                continue
            }
            if frame.type == RPCFrameType.error {
                closeDescriptors(descriptors)
                waiter.resume(returning: .failure(HoldfastError(errorFrameBody: frame.body, frameType: frame.type)))
            } else {
                waiter.resume(returning: .success(RPCResponse(frame: frame, descriptors: descriptors)))
            }
        }
        beforeFailingPending()
        finish()
    }

    /// Fails every request still waiting and refuses new ones. The transport closes first: a
    /// failed request's caller closes the fds it asked to send, whose numbers a new open may
    /// take at once — a send still under way must find the transport closed, not pass that
    /// file to the peer.
    private func finish() {
        let pending = state.withLockedValue { s -> [CheckedContinuation<Result<RPCResponse, HoldfastError>, Never>] in
            s.closed = true
            defer { s.pending.removeAll() }
            return Array(s.pending.values)
        }
        transport.close()
        for waiter in pending {
            waiter.resume(returning: .failure(HoldfastError(.channelClosed, "the peer closed the control channel")))
        }
    }

    /// Whether `run()` has ended (the connection is gone).
    /// Sends a notification (id 0, no reply). One that cannot be sent ends the channel, as a
    /// request that cannot (`request`): nothing says it again, and the peer would go on
    /// believing what it last heard (a bridge up that is down) — a role whose channel ends is
    /// restarted and says it all again.
    public func notify(_ type: UInt32, body: [UInt8] = []) async throws(FrameTransportError) {
        do {
            try await transport.send(ControlFrame(type: type, id: 0, body: body), descriptors: [])
        } catch {
            transport.stopSending()  // as a request's (above): what the peer sent is still read
            throw error
        }
    }

    public var isClosed: Bool { state.withLockedValue { $0.closed } }

    public func close() { transport.close() }
}
