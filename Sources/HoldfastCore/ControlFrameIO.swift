import HoldfastProtocol

/// Control frames over a byte stream (the bridge): one frame at a time in, one writer out.
public enum ControlFrameIO {
    /// Why a control connection is being closed.
    public enum ReadError: Error, Sendable, Equatable, CustomStringConvertible {
        /// The peer closed the connection between frames.
        case endOfStream
        /// The connection ended inside a frame.
        case truncated
        /// The header announced a body over the limit; `id` is the frame's id, for the error reply.
        case oversized(length: Int, limit: Int, id: UInt64)

        public var description: String {
            switch self {
            case .endOfStream: "end of stream"
            case .truncated: "connection ended inside a frame"
            case .oversized(let length, let limit, _): "frame body of \(length) bytes exceeds the limit of \(limit)"
            }
        }
    }

    /// Reads one frame. Any error means the connection is unusable (the frame boundary is lost).
    public static func read(from connection: some ByteReader, maxBody: Int) async throws -> ControlFrame {
        let header = UnsafeMutableRawBufferPointer.allocate(byteCount: ControlFrame.headerSize, alignment: 8)
        defer { header.deallocate() }
        let first = try await connection.read(into: header)
        if first == 0 { throw ReadError.endOfStream }
        if first < header.count {
            do {
                try await FrameIO.readExactly(connection, into: UnsafeMutableRawBufferPointer(rebasing: header[first...]))
            } catch StreamProtocolError.truncated {
                throw ReadError.truncated
            }
        }
        let decoded: ControlFrame.Header
        do {
            decoded = try ControlFrame.decodeHeader(UnsafeRawBufferPointer(header), maxBody: Int.max)
        } catch {
            throw ReadError.truncated  // cannot happen: the header is complete
        }
        guard decoded.bodyLength <= maxBody else {
            throw ReadError.oversized(length: decoded.bodyLength, limit: maxBody, id: decoded.id)
        }
        guard decoded.bodyLength > 0 else { return ControlFrame(type: decoded.type, id: decoded.id, body: []) }
        let body = UnsafeMutableRawBufferPointer.allocate(byteCount: decoded.bodyLength, alignment: 1)
        defer { body.deallocate() }
        do {
            try await FrameIO.readExactly(connection, into: body)
        } catch StreamProtocolError.truncated {
            throw ReadError.truncated
        }
        return ControlFrame(type: decoded.type, id: decoded.id, body: Array(body))
    }
}

/// Serialises frame writes on one connection: request handlers and notifications run on
/// different tasks, and two writes must never interleave on the wire. Frames queue in order;
/// the first failed write closes the connection and drops the rest (their `whenWritten` still
/// runs, so whoever waits on one is never left waiting).
public final class ControlFrameWriter<Connection: ByteConnection>: Sendable {
    private struct Queued: Sendable {
        var bytes: [UInt8]
        var whenWritten: (@Sendable () -> Void)?
    }

    private let continuation: AsyncStream<Queued>.Continuation
    private let task: Task<Void, Never>

    public init(_ connection: Connection) {
        let (stream, continuation) = AsyncStream<Queued>.makeStream()
        self.continuation = continuation
        task = Task {
            var failed = false
            for await queued in stream {
                if !failed {
                    do {
                        try await FrameIO.write(queued.bytes, to: connection)
                    } catch {
                        failed = true
                        connection.close()
                        continuation.finish()
                    }
                }
                queued.whenWritten?()
            }
        }
    }

    /// Queues `frame`; `whenWritten` runs once it is written (or dropped with the connection):
    /// a reader that holds a permit until then bounds what a slow peer can make us queue.
    public func send(_ frame: ControlFrame, whenWritten: (@Sendable () -> Void)? = nil) {
        if case .terminated = continuation.yield(Queued(bytes: frame.encoded, whenWritten: whenWritten)) {
            whenWritten?()
        }
    }

    /// Stops after the frames already queued.
    public func finish() {
        continuation.finish()
    }

    /// Stops after the frames already queued and waits (at most `timeout`: a peer that does not
    /// read must not hold us) until they are written — e.g. an error reply before a close.
    public func flush(timeout: Duration = .seconds(1)) async {
        continuation.finish()
        let writer = task
        let timer = TimeoutWheel.shared.schedule(after: timeout) { writer.cancel() }
        await writer.value
        TimeoutWheel.shared.cancel(timer)
    }
}
