import NIOConcurrencyHelpers

/// A small pool of fixed-size, uninitialised byte buffers for the data plane.
///
/// Relays borrow a buffer only once their source is readable and give it back as soon as it is
/// written out, so thousands of idle streams hold no buffer at all, while a busy one reuses the
/// same memory without allocating or zero-filling per chunk.
public final class BufferPool: Sendable {
    public let bufferSize: Int
    private let retained: Int
    private let free: NIOLockedValueBox<[Buffer]>

    /// A borrowed buffer. Give it back with `BufferPool.recycle` (or let `withBuffer` do it).
    public struct Buffer: @unchecked Sendable {
        public let bytes: UnsafeMutableRawBufferPointer
    }

    public init(bufferSize: Int = 128 * 1024, retained: Int = 32) {
        precondition(bufferSize > 0)
        self.bufferSize = bufferSize
        self.retained = retained
        self.free = NIOLockedValueBox([])
    }

    public static let shared = BufferPool()

    public func take() -> Buffer {
        if let buffer = free.withLockedValue({ $0.popLast() }) { return buffer }
        return Buffer(bytes: .allocate(byteCount: bufferSize, alignment: 16))
    }

    public func recycle(_ buffer: Buffer) {
        let keep = free.withLockedValue { list -> Bool in
            guard list.count < retained else { return false }
            list.append(buffer)
            return true
        }
        if !keep { buffer.bytes.deallocate() }
    }

    deinit {
        for buffer in free.withLockedValue({ $0 }) { buffer.bytes.deallocate() }
    }
}
