import HoldfastCore
import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// Control frames over a SOCK_SEQPACKET channel: one frame per message, fds by SCM_RIGHTS (the
/// daemon's control socket, the broker's channels, host serve's control socket).
public final class SeqpacketFrames: FrameTransport {
    public let channel: FDChannel

    public init(_ channel: FDChannel) { self.channel = channel }

    public func receive() async throws(FrameTransportError) -> (frame: ControlFrame, descriptors: [Int32]) {
        let message: ReceivedMessage
        do {
            message = try await channel.receive(maxPayload: ControlFrame.headerSize + ControlFrame.defaultMaxBody)
        } catch .endOfFile {
            throw .ended
        } catch .descriptorsTruncated(let payload) {
            // This process is at its limit on open files: that frame is refused, not the channel
            // (a broker that ended its supervisor's channel here would be restarted, only to
            // hit the same limit).
            guard let frame = try? ControlFrame.decode(datagram: payload) else { throw .broken(FDPassingError.descriptorsTruncated(payload: payload).description) }
            throw .refused(
                frame,
                HoldfastError(.tooManyOpenFiles, "the fds sent with this request did not all arrive: the receiver is at its limit on open files"))
        } catch {
            throw .broken(error.description)
        }
        do {
            return (try ControlFrame.decode(datagram: message.payload), message.descriptors)
        } catch {
            message.closeDescriptors()
            throw .broken("not a control frame: \(error)")
        }
    }

    public func send(_ frame: ControlFrame, descriptors: [Int32]) async throws(FrameTransportError) {
        do {
            try await channel.send(frame.encoded, descriptors: descriptors)
        } catch {
            throw .broken(error.description)
        }
    }

    public func close() { channel.close() }

    public func stopSending() { channel.socket.shutdownWrite() }

    /// Closes fds a frame brought that nobody keeps, on a closer thread (`ForeignCloser`: the
    /// last close of a file runs its release, which its sender can make wait).
    @Sendable public static func closeDescriptors(_ descriptors: [Int32]) {
        ForeignCloser.shared.close(descriptors)
    }
}

/// The client end of a SOCK_SEQPACKET control socket: `RPCClient` over `SeqpacketFrames`.
public typealias ControlClient = RPCClient

extension RPCClient {
    /// A client on `channel`; `run()` must be running for replies to arrive.
    public convenience init(channel: FDChannel, onNotification: @escaping @Sendable (ControlFrame) async -> Void = { _ in }) {
        self.init(transport: SeqpacketFrames(channel), closeDescriptors: SeqpacketFrames.closeDescriptors, onNotification: onNotification)
    }

    /// A client on `channel` whose notifications may carry fds (the handler closes them).
    public convenience init(channel: FDChannel, onNotificationWithDescriptors: @escaping @Sendable (ControlFrame, [Int32]) async -> Void) {
        self.init(
            transport: SeqpacketFrames(channel), closeDescriptors: SeqpacketFrames.closeDescriptors,
            onNotificationWithDescriptors: onNotificationWithDescriptors)
    }

    /// Connects to a control socket and starts reading replies.
    public static func connect(to path: String, timeout: Duration = .seconds(2)) async throws -> RPCClient {
        let socket = try await Dialer.connect(to: .unix(path: path), kind: .seqpacket, timeout: timeout)
        let client = RPCClient(channel: FDChannel(socket))
        Task { await client.run() }
        return client
    }

    public typealias ReceivedFrame = RPCResponse
}

/// Serving a SOCK_SEQPACKET control socket with `RPCServer`.
extension RPCServer {
    public static func serve<Request: RPCRequest>(
        _ channel: FDChannel, as request: Request.Type, inFlight: Int, cancelWhenClosed: Bool = false,
        notification: @escaping @Sendable (ControlFrame) async -> Void = { _ in },
        handle: @escaping Handler<Request>
    ) async -> RPCServerEnd {
        await serve(
            SeqpacketFrames(channel), as: request, inFlight: inFlight, cancelWhenClosed: cancelWhenClosed, notification: notification,
            closeDescriptors: SeqpacketFrames.closeDescriptors, handle: handle)
    }
}
