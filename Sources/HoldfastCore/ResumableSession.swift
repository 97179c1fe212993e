import HoldfastProtocol
import Synchronization

/// A stream connection after its hello exchange: the transport plus what the peer reported.
///
/// Reads return first any bytes a reader gave back (`unread`): the receiver reads a frame's
/// header together with a guess at its body, and what the guess took past the frame's end is
/// the start of the next frame, to be read again as such.
public final class ResumableSession<Transport: ByteConnection>: ByteConnection {
    public let transport: Transport
    /// The peer's hello: its token and how much of our data it holds.
    public let peerHello: StreamHello
    /// The received offset we reported in our hello on this connection.
    public let ourReceivedOffset: UInt64
    /// Bytes given back, read before the transport's. Only the one reader of the connection
    /// touches them; the lock makes that safe to state, and is taken only while some are held
    /// (`holdsUnread`), which is rare: a read-ahead rarely overshoots.
    private let givenBack = Mutex<GivenBack>(GivenBack())
    private let holdsUnread = Atomic<Bool>(false)

    private struct GivenBack {
        var bytes: [UInt8] = []
        var start = 0
        var isEmpty: Bool { start == bytes.count }
    }

    public init(transport: Transport, peerHello: StreamHello, ourReceivedOffset: UInt64) {
        self.transport = transport
        self.peerHello = peerHello
        self.ourReceivedOffset = ourReceivedOffset
    }

    /// Gives back `bytes` read past what the reader needed: the next reads return them first,
    /// ahead of any given back before (they were read after those).
    public func unread(_ bytes: UnsafeRawBufferPointer) {
        guard !bytes.isEmpty else { return }
        givenBack.withLock { held in
            held.bytes = Array(bytes) + held.bytes[held.start...]
            held.start = 0
        }
        holdsUnread.store(true, ordering: .releasing)
    }

    /// Bytes given back and not yet read again.
    public var unreadCount: Int {
        givenBack.withLock { $0.bytes.count - $0.start }
    }

    /// Copies given-back bytes into `buffers`, in order: nil when none are held.
    private func readGivenBack(into buffers: [UnsafeMutableRawBufferPointer]) -> Int? {
        guard holdsUnread.load(ordering: .acquiring) else { return nil }
        return givenBack.withLock { held -> Int? in
            guard !held.isEmpty else { return nil }
            var copied = 0
            for buffer in buffers where !held.isEmpty {
                let count = min(buffer.count, held.bytes.count - held.start)
                held.bytes.withUnsafeBytes { source in
                    buffer.baseAddress!.copyMemory(from: source.baseAddress! + held.start, byteCount: count)
                }
                held.start += count
                copied += count
            }
            if held.isEmpty {
                held = GivenBack()
                holdsUnread.store(false, ordering: .releasing)
            }
            return copied
        }
    }

    public func waitReadable() async throws {
        if holdsUnread.load(ordering: .acquiring) { return }
        try await transport.waitReadable()
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) async throws -> Int {
        if let count = readGivenBack(into: [buffer]) { return count }
        return try await transport.read(into: buffer)
    }

    public func readNow(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? {
        if let count = readGivenBack(into: [buffer]) { return count }
        return try transport.readNow(into: buffer)
    }

    public func readNow(into buffers: [UnsafeMutableRawBufferPointer]) throws -> Int? {
        if let count = readGivenBack(into: buffers) { return count }
        return try transport.readNow(into: buffers)
    }

    public func write(_ bytes: UnsafeRawBufferPointer) async throws(WriteFailure) { try await transport.write(bytes) }
    public func write(_ header: UnsafeRawBufferPointer, _ body: UnsafeRawBufferPointer) async throws(WriteFailure) {
        try await transport.write(header, body)
    }
    public func write(vectors: [UnsafeRawBufferPointer]) async throws(WriteFailure) { try await transport.write(vectors: vectors) }
    public func close() { transport.close() }
    public func shutdownWrite() { transport.shutdownWrite() }
}
