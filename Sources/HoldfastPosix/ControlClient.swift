import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// Requests and responses over an `FDChannel` carrying control frames: each request gets an id,
/// replies are matched by id, and frames with id 0 are notifications handed to `onNotification`.
/// `run()` reads until the channel closes; pending requests then fail with `channel-closed`.
public final class ControlClient: Sendable {
    public let channel: FDChannel
    private let state = NIOLockedValueBox(State())
    private let onNotification: @Sendable (ControlFrame) async -> Void

    private struct State: Sendable {
        var nextID: UInt64 = 0
        var pending: [UInt64: CheckedContinuation<Result<ReceivedFrame, HoldfastError>, Never>] = [:]
        var closed = false
    }

    public struct ReceivedFrame: Sendable {
        public var frame: ControlFrame
        public var descriptors: [Int32]
    }

    public init(channel: FDChannel, onNotification: @escaping @Sendable (ControlFrame) async -> Void = { _ in }) {
        self.channel = channel
        self.onNotification = onNotification
    }

    /// Connects to a control socket (SOCK_SEQPACKET) and starts reading replies.
    public static func connect(to path: String, timeout: Duration = .seconds(2)) async throws -> ControlClient {
        let socket = try await Dialer.connect(to: .unix(path: path), kind: .seqpacket, timeout: timeout)
        let client = ControlClient(channel: FDChannel(socket))
        Task { await client.run() }
        return client
    }

    /// Sends a request and waits for its reply. An `error` reply (type 0x0002) is thrown as its
    /// coded body. fds that come with the reply belong to the caller.
    public func request(
        _ type: UInt32, body: [UInt8], descriptors: [Int32] = [], okType: UInt32 = 0x0001
    ) async throws(HoldfastError) -> ReceivedFrame {
        let id = state.withLockedValue { s -> UInt64? in
            guard !s.closed else { return nil }
            s.nextID &+= 1
            return s.nextID
        }
        guard let id else { throw HoldfastError(.channelClosed, "the control channel is closed") }
        let result = await withCheckedContinuation { (continuation: CheckedContinuation<Result<ReceivedFrame, HoldfastError>, Never>) in
            // The reader may have ended since the id was taken: then nobody would resume this.
            let registered = state.withLockedValue { s -> Bool in
                guard !s.closed else { return false }
                s.pending[id] = continuation
                return true
            }
            guard registered else {
                continuation.resume(returning: .failure(HoldfastError(.channelClosed, "the peer closed the control channel")))
                return
            }
            Task {
                do {
                    try await channel.send(ControlFrame(type: type, id: id, body: body).encoded, descriptors: descriptors)
                } catch {
                    state.withLockedValue { $0.pending.removeValue(forKey: id) }?
                        .resume(returning: .failure(HoldfastError(.channelClosed, "\(error)")))
                }
            }
        }
        return try result.get()
    }

    /// Convenience: encode a Codable request, decode a Codable reply.
    public func call<Request: Encodable, Reply: Decodable>(
        _ type: UInt32, _ request: Request, descriptors: [Int32] = [], reply: Reply.Type
    ) async throws(HoldfastError) -> Reply {
        let received = try await self.request(type, body: ControlJSON.encode(request), descriptors: descriptors)
        for fd in received.descriptors { _ = Glibc.close(fd) }
        do {
            return try ControlJSON.decode(Reply.self, from: received.frame.body, frameType: received.frame.type)
        } catch {
            throw HoldfastError(.badReply, error.description)
        }
    }

    public func run() async {
        while true {
            let message: ReceivedMessage
            do {
                message = try await channel.receive(maxPayload: ControlFrame.headerSize + ControlFrame.defaultMaxBody)
            } catch {
                break
            }
            guard let frame = try? ControlFrame.decode(datagram: message.payload) else {
                message.closeDescriptors()
                break
            }
            if frame.id == 0 {
                message.closeDescriptors()
                await onNotification(frame)
                continue
            }
            let waiter = state.withLockedValue { $0.pending.removeValue(forKey: frame.id) }
            guard let waiter else {
                message.closeDescriptors()  // a reply nobody asked for
                continue
            }
            if frame.type == 0x0002 {
                message.closeDescriptors()
                waiter.resume(returning: .failure(HoldfastError(errorFrameBody: frame.body, frameType: frame.type)))
            } else {
                waiter.resume(returning: .success(ReceivedFrame(frame: frame, descriptors: message.descriptors)))
            }
        }
        let pending = state.withLockedValue { s -> [CheckedContinuation<Result<ReceivedFrame, HoldfastError>, Never>] in
            s.closed = true
            defer { s.pending.removeAll() }
            return Array(s.pending.values)
        }
        for waiter in pending {
            waiter.resume(returning: .failure(HoldfastError(.channelClosed, "the peer closed the control channel")))
        }
        channel.close()
    }

    public func close() { channel.close() }
}
