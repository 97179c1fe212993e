import HoldfastProtocol

/// A stream connection after its hello exchange: the transport plus what the peer reported.
public final class ResumableSession<Transport: ByteConnection>: ByteConnection {
    public let transport: Transport
    /// The peer's hello: its token and how much of our data it holds.
    public let peerHello: StreamHello
    /// The received offset we reported in our hello on this connection.
    public let ourReceivedOffset: UInt64

    public init(transport: Transport, peerHello: StreamHello, ourReceivedOffset: UInt64) {
        self.transport = transport
        self.peerHello = peerHello
        self.ourReceivedOffset = ourReceivedOffset
    }

    public func waitReadable() async throws { try await transport.waitReadable() }
    public func read(into buffer: UnsafeMutableRawBufferPointer) async throws -> Int { try await transport.read(into: buffer) }
    public func readNow(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? { try transport.readNow(into: buffer) }
    public func readNow(into buffers: [UnsafeMutableRawBufferPointer]) throws -> Int? { try transport.readNow(into: buffers) }
    public func write(_ bytes: UnsafeRawBufferPointer) async throws(WriteFailure) { try await transport.write(bytes) }
    public func write(_ header: UnsafeRawBufferPointer, _ body: UnsafeRawBufferPointer) async throws(WriteFailure) {
        try await transport.write(header, body)
    }
    public func write(vectors: [UnsafeRawBufferPointer]) async throws(WriteFailure) { try await transport.write(vectors: vectors) }
    public func close() { transport.close() }
    public func shutdownWrite() { transport.shutdownWrite() }
}

/// Reading and writing whole frames on a ByteConnection.
public enum FrameIO {
    /// Reads exactly `buffer.count` bytes. Throws `StreamProtocolError.truncated` at end-of-file.
    public static func readExactly(_ connection: some ByteReader, into buffer: UnsafeMutableRawBufferPointer) async throws {
        var filled = 0
        while filled < buffer.count {
            let count = try await connection.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[filled...]))
            if count == 0 { throw StreamProtocolError.truncated }
            filled += count
        }
    }

    /// Reads one frame's prefix and body (bodies are small outside DATA frames).
    public static func readFrame(_ connection: some ByteReader) async throws -> (StreamFramePrefix, [UInt8]) {
        let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: StreamFramePrefix.size, alignment: 8)
        defer { raw.deallocate() }
        try await readExactly(connection, into: raw)
        let prefix = try StreamFramePrefix.decode(UnsafeRawBufferPointer(raw))
        guard prefix.bodyLength > 0 else { return (prefix, []) }
        guard prefix.type != .data else { return (prefix, []) }  // the caller reads data bodies itself
        let body = UnsafeMutableRawBufferPointer.allocate(byteCount: prefix.bodyLength, alignment: 1)
        defer { body.deallocate() }
        try await readExactly(connection, into: body)
        return (prefix, Array(body))
    }

    public static func write(_ bytes: [UInt8], to connection: some ByteWriter) async throws(WriteFailure) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 8)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: bytes)
        try await connection.write(UnsafeRawBufferPointer(rebasing: buffer[..<bytes.count]))
    }
}

/// The hello exchange. The guest (which dials) speaks first; the host reads the guest's hello to
/// learn which stream it is, then answers. Either side that dislikes what it reads sends an
/// ERROR frame and closes that connection; the stream itself is untouched.
public enum Handshake {
    /// Dialing side: sends `hello`, reads the peer's answer, validates it.
    public static func initiate<C: ByteConnection>(
        on connection: C, hello: StreamHello, validate: (StreamHello) -> StreamProtocolError?
    ) async throws -> ResumableSession<C> {
        try await FrameIO.write(hello.encoded, to: connection)
        let (prefix, body) = try await FrameIO.readFrame(connection)
        if prefix.type == .error { throw StreamProtocolError.refusedByPeer(StreamRefusal.decode(prefix: prefix, body: body)) }
        let peer = try StreamHello.decode(prefix: prefix, body: body)
        if let problem = validate(peer) {
            await refuse(connection, problem)
            throw problem
        }
        return ResumableSession(transport: connection, peerHello: peer, ourReceivedOffset: hello.receivedOffset)
    }

    /// The hello at the start of `bytes` (a peek at what a connection has sent so far), or nil
    /// when it is not all there yet or is not a hello.
    public static func hello(atStartOf bytes: [UInt8]) -> StreamHello? {
        guard bytes.count >= StreamFramePrefix.size,
            let prefix = bytes.withUnsafeBytes({ try? StreamFramePrefix.decode(UnsafeRawBufferPointer(rebasing: $0[..<StreamFramePrefix.size])) }),
            prefix.type == .hello, bytes.count >= StreamFramePrefix.size + prefix.bodyLength
        else { return nil }
        return try? StreamHello.decode(prefix: prefix, body: Array(bytes[StreamFramePrefix.size..<StreamFramePrefix.size + prefix.bodyLength]))
    }

    /// Accepting side, first half: reads the dialer's hello (the caller bounds the wait).
    public static func readHello(from connection: some ByteConnection) async throws -> StreamHello {
        let (prefix, body) = try await FrameIO.readFrame(connection)
        return try StreamHello.decode(prefix: prefix, body: body)
    }

    /// Sends an ERROR frame for `problem` (best effort) and closes the connection — gracefully:
    /// our side is shut down first and what the peer still sends is drained for a moment, because
    /// closing a socket with unread input resets it and the peer would never read why.
    public static func refuse(_ connection: some ByteConnection, _ problem: StreamProtocolError) async {
        try? await FrameIO.write(problem.refusal.encoded, to: connection)
        connection.shutdownWrite()
        let drain = Task {
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 1)
            defer { scratch.deallocate() }
            var total = 0
            while total < 1 << 16, let count = try? await connection.read(into: scratch), count > 0 { total += count }
        }
        let deadline = TimeoutWheel.shared.schedule(after: .milliseconds(200)) { drain.cancel() }
        await drain.value
        TimeoutWheel.shared.cancel(deadline)
        connection.close()
    }
}
