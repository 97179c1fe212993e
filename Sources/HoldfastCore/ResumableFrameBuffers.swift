import HoldfastProtocol

/// Reads a sender's incoming frames (acknowledgements, the END echo, an ERROR) through a small
/// buffer, so acknowledgements that arrived together cost one read, and a read that emptied the
/// socket lets the next wait skip its EAGAIN probe. One per reading task; `reset` on every new
/// connection (bytes of an old one are never read as the new one's).
final class BufferedFrameReader: @unchecked Sendable {
    /// Sixteen prefixes: small, because every outbound stream keeps one for its whole life.
    private let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 * StreamFramePrefix.size, alignment: 8)
    private var start = 0
    private var end = 0
    private var generation: UInt64 = 0

    deinit { buffer.deallocate() }

    func reset(for generation: UInt64) {
        guard generation != self.generation else { return }
        self.generation = generation
        start = 0
        end = 0
    }

    /// The next frame's prefix. A body is left for `body(of:from:)`.
    func next(from connection: some ByteReader) async throws -> StreamFramePrefix {
        try await fill(StreamFramePrefix.size, from: connection)
        let prefix = try StreamFramePrefix.decode(UnsafeRawBufferPointer(rebasing: buffer[start..<start + StreamFramePrefix.size]))
        start += StreamFramePrefix.size
        return prefix
    }

    /// The body of a non-DATA frame (at most a few hundred bytes, by the prefix's limits): what
    /// is buffered, then the rest read directly.
    func body(of prefix: StreamFramePrefix, from connection: some ByteReader) async throws -> [UInt8] {
        let buffered = min(prefix.bodyLength, end - start)
        var body = Array(buffer[start..<start + buffered])
        start += buffered
        if body.count < prefix.bodyLength {
            let rest = UnsafeMutableRawBufferPointer.allocate(byteCount: prefix.bodyLength - body.count, alignment: 1)
            defer { rest.deallocate() }
            try await FrameIO.readExactly(connection, into: rest)
            body += rest
        }
        return body
    }

    private func fill(_ count: Int, from connection: some ByteReader) async throws {
        if buffer.count - start < count {
            buffer.baseAddress!.copyMemory(from: buffer.baseAddress! + start, byteCount: end - start)
            end -= start
            start = 0
        }
        while end - start < count {
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[end...])
            guard let got = try connection.readNow(into: target) else {
                try await connection.waitReadable()
                continue
            }
            if got == 0 { throw StreamProtocolError.truncated }
            end += got
        }
    }
}

/// A few bytes of scratch memory owned by one engine and used by one task at a time (the
/// holder of the sending token, or the one receiving task), which is why it is `@unchecked`.
final class ScratchBytes: @unchecked Sendable {
    let bytes: UnsafeMutableRawBufferPointer

    init(count: Int) {
        bytes = .allocate(byteCount: count, alignment: 8)
    }

    deinit { bytes.deallocate() }

    func slice(_ offset: Int, _ count: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: bytes[offset..<offset + count])
    }
}
