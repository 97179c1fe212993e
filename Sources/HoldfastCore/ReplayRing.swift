/// The unacknowledged bytes of one outbound stream, kept for replay after a reconnect.
///
/// Offsets are absolute stream positions (64-bit). The ring holds exactly the bytes in
/// `[acknowledged, end)`, in fixed-size blocks borrowed from a `BufferPool`:
/// - it grows on demand, one block at a time, up to `capacity` unacknowledged bytes;
/// - acknowledged blocks go straight back to the pool, and once everything is acknowledged even
///   the partly filled tail does, so an idle stream holds no block at all;
/// - a block never moves, so a producer can read a pipe straight into the tail (`reserve` /
///   `commit`) while a sender writes straight from an earlier block: no copy beyond the kernel's.
///
/// Not thread-safe: its owner serialises every call under one lock (hence `@unchecked
/// Sendable`). Memory handed out stays valid outside that lock because nothing is freed while
/// reserved (the producer's tail) or pinned (the block a sender is writing from) — a hostile
/// early acknowledgement cannot free memory under a write in progress.
public final class ReplayRing: @unchecked Sendable {
    public let capacity: Int
    private let pool: BufferPool
    private var blocks: [BufferPool.Buffer] = []
    /// Stream offset of `blocks[0]`'s first byte.
    private var firstBlockOffset: UInt64
    public private(set) var acknowledged: UInt64
    public private(set) var end: UInt64
    private var reserved = false
    private var pinned: UInt64?

    /// A ring whose next byte is stream offset `start`.
    public init(capacity: Int = 1 << 20, pool: BufferPool, start: UInt64 = 0) {
        precondition(capacity > 0)
        self.capacity = capacity
        self.pool = pool
        self.firstBlockOffset = start
        self.acknowledged = start
        self.end = start
    }

    deinit {
        for block in blocks { pool.recycle(block) }
    }

    private var blockSize: Int { pool.bufferSize }

    /// Unacknowledged bytes held.
    public var count: Int { Int(end - acknowledged) }
    public var isFull: Bool { count >= capacity }
    /// Blocks currently held (memory in use is `blockCount × pool.bufferSize`).
    public var blockCount: Int { blocks.count }

    // MARK: Producer

    /// Writable space at the end of the ring, up to the end of the tail block and never beyond
    /// `capacity` unacknowledged bytes; empty when the ring is full. Fill a prefix, then `commit`.
    public func reserve() -> UnsafeMutableRawBufferPointer {
        let room = capacity - count
        guard room > 0 else { return UnsafeMutableRawBufferPointer(start: nil, count: 0) }
        var used = usedInTail
        if blocks.isEmpty || used == blockSize {
            if blocks.isEmpty { firstBlockOffset = end }
            blocks.append(pool.take())
            used = 0
        }
        reserved = true
        let tail = blocks[blocks.count - 1].bytes
        return UnsafeMutableRawBufferPointer(rebasing: tail[used..<min(blockSize, used + room)])
    }

    /// Records that `count` bytes of the last `reserve()` were written (0 is fine).
    public func commit(_ count: Int) {
        precondition(reserved, "commit without reserve")
        precondition(count >= 0 && self.count + count <= capacity)
        reserved = false
        end += UInt64(count)
        release()
    }

    /// Appends by copying; returns how many bytes fitted.
    @discardableResult
    public func append(_ bytes: UnsafeRawBufferPointer) -> Int {
        var copied = 0
        while copied < bytes.count {
            let space = reserve()
            guard space.count > 0 else {
                if reserved { commit(0) }
                break
            }
            let chunk = min(space.count, bytes.count - copied)
            space.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[copied..<copied + chunk]))
            commit(chunk)
            copied += chunk
        }
        return copied
    }

    // MARK: Sender

    /// The contiguous bytes from `offset`, up to the end of its block and at most `limit`.
    /// `offset` must lie in `[acknowledged, end)`. Pin the block while writing from it.
    public func bytes(from offset: UInt64, limit: Int) -> UnsafeRawBufferPointer {
        precondition(offset >= acknowledged && offset < end, "offset \(offset) outside [\(acknowledged), \(end))")
        let relative = Int(offset - firstBlockOffset)
        let index = relative / blockSize
        let within = relative % blockSize
        let available = min(blockSize - within, Int(end - offset), limit)
        return UnsafeRawBufferPointer(rebasing: blocks[index].bytes[within..<within + available])
    }

    /// Keeps the block holding `offset`, and every later one, alive until `unpin()`.
    public func pin(_ offset: UInt64) {
        pinned = offset
    }

    public func unpin() {
        pinned = nil
        release()
    }

    // MARK: Acknowledgements

    /// Every byte before `offset` was received by the peer. `offset` must lie in
    /// `[acknowledged, end]` (the owner validates what a peer reports).
    public func acknowledge(upTo offset: UInt64) {
        precondition(offset >= acknowledged && offset <= end, "ack \(offset) outside [\(acknowledged), \(end)]")
        acknowledged = offset
        release()
    }

    // MARK: Internals

    private var usedInTail: Int {
        guard !blocks.isEmpty else { return 0 }
        return Int(end - firstBlockOffset) - (blocks.count - 1) * blockSize
    }

    /// Returns acknowledged blocks to the pool, never one that is reserved or pinned.
    private func release() {
        while !blocks.isEmpty {
            let blockEnd = firstBlockOffset + UInt64(blockSize)
            let fullyAcknowledged = blockEnd <= acknowledged
            let idleTail = blocks.count == 1 && acknowledged == end && !reserved
            guard fullyAcknowledged || idleTail else { return }
            if let pinned, pinned < blockEnd { return }
            pool.recycle(blocks.removeFirst())
            firstBlockOffset = fullyAcknowledged ? blockEnd : end
        }
    }
}
