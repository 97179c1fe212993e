/// Where a replay ring's memory comes from: fixed-size blocks, taken while the ring holds bytes
/// and given back once they are acknowledged. Today a `BufferPool` of heap blocks shared by every
/// stream; a stream's own shared mapping (a memfd that outlives a restart of the relay) can hand
/// out the same blocks from its pages.
public protocol RingBlockStorage: AnyObject, Sendable {
    var blockSize: Int { get }
    func takeBlock() -> UnsafeMutableRawBufferPointer
    /// A block whose first byte will be stream offset `offset` (a storage that must be read
    /// back after a crash records it; the ring always says).
    func takeBlock(startingAt offset: UInt64) -> UnsafeMutableRawBufferPointer
    func recycleBlock(_ block: UnsafeMutableRawBufferPointer)
}

extension RingBlockStorage {
    public func takeBlock(startingAt offset: UInt64) -> UnsafeMutableRawBufferPointer { takeBlock() }
}

/// A ring's blocks as a crashed relay left them in memory that outlived it: the blocks holding
/// `[start, end)` in order, the first starting at `start`.
public struct RestoredRing: @unchecked Sendable {
    public var blocks: [UnsafeMutableRawBufferPointer]
    public var start: UInt64
    public var end: UInt64

    public init(blocks: [UnsafeMutableRawBufferPointer], start: UInt64, end: UInt64) {
        self.blocks = blocks
        self.start = start
        self.end = end
    }
}

extension BufferPool: RingBlockStorage {
    public var blockSize: Int { bufferSize }
    public func takeBlock() -> UnsafeMutableRawBufferPointer { take().bytes }
    public func recycleBlock(_ block: UnsafeMutableRawBufferPointer) { recycle(Buffer(bytes: block)) }
}

/// The unacknowledged bytes of one outbound stream, kept for replay after a reconnect.
///
/// Offsets are absolute stream positions (64-bit). The ring holds exactly the bytes in
/// `[acknowledged, end)`, in fixed-size blocks from its `RingBlockStorage`:
/// - it grows on demand, a block at a time, up to `capacity` unacknowledged bytes;
/// - acknowledged blocks go straight back, and once everything is acknowledged even the partly
///   filled tail does, so an idle stream holds no block at all;
/// - a block never moves, so a producer reads a pipe straight into the ring's free space
///   (`reserve` / `commit`: a byte leaves the pipe only into the ring, and counts once committed)
///   while a sender writes straight from earlier blocks: no copy beyond the kernel's. Both work
///   on lists of regions, so one readv fills several blocks and one sendmsg sends them.
///
/// Not thread-safe: its owner serialises every call under one lock (hence `@unchecked
/// Sendable`). Memory handed out stays valid outside that lock because nothing is freed while
/// reserved (the producer's regions) or pinned (the blocks a sender is writing from) — a hostile
/// early acknowledgement cannot free memory under a write in progress.
public final class ReplayRing: @unchecked Sendable {
    /// A block: 64 KiB (a heap pool's, or a shared ring region's).
    public static let defaultBlockSize = 64 * 1024

    public let capacity: Int
    private let storage: any RingBlockStorage
    private let blockSize: Int
    private var blocks: [UnsafeMutableRawBufferPointer] = []
    /// Stream offset of `blocks[0]`'s first byte.
    private var firstBlockOffset: UInt64
    public private(set) var acknowledged: UInt64
    public private(set) var end: UInt64
    private var reserved = false
    private var pinned: UInt64?

    /// A ring whose next byte is stream offset `start`.
    public init(capacity: Int = 1 << 20, storage: any RingBlockStorage, start: UInt64 = 0) {
        precondition(capacity > 0)
        self.capacity = capacity
        self.storage = storage
        self.blockSize = storage.blockSize
        self.firstBlockOffset = start
        self.acknowledged = start
        self.end = start
    }

    /// A ring holding again what a crashed relay's ring held (its storage's blocks): the bytes
    /// `[restored.start, restored.end)`, none of them acknowledged yet.
    public init(capacity: Int, storage: any RingBlockStorage, restoring restored: RestoredRing) {
        precondition(capacity > 0)
        precondition(restored.end >= restored.start && restored.end - restored.start <= UInt64(restored.blocks.count * storage.blockSize))
        self.capacity = capacity
        self.storage = storage
        self.blockSize = storage.blockSize
        self.firstBlockOffset = restored.start
        self.acknowledged = restored.start
        self.end = restored.end
        self.blocks = restored.blocks
    }

    public convenience init(capacity: Int = 1 << 20, pool: BufferPool, start: UInt64 = 0) {
        self.init(capacity: capacity, storage: pool, start: start)
    }

    deinit {
        for block in blocks { storage.recycleBlock(block) }
    }

    /// Unacknowledged bytes held.
    public var count: Int { Int(end - acknowledged) }
    public var isFull: Bool { count >= capacity }
    /// Room for more bytes before the ring is full.
    public var room: Int { max(0, capacity - count) }
    /// Blocks currently held (memory in use is `blockCount × blockSize`).
    public var blockCount: Int { blocks.count }

    // MARK: Producer

    /// Writable space at the end of the ring, up to the end of the tail block and never beyond
    /// `capacity` unacknowledged bytes; empty when the ring is full. Fill a prefix, then `commit`.
    public func reserve() -> UnsafeMutableRawBufferPointer {
        let used = usedInTail
        let tailRoom = blocks.isEmpty || used == blockSize ? blockSize : blockSize - used
        return reserve(upTo: tailRoom).first ?? UnsafeMutableRawBufferPointer(start: nil, count: 0)
    }

    /// Writable space at the end of the ring as regions in stream order, `limit` bytes in all at
    /// most and never beyond `capacity` unacknowledged bytes; empty when the ring is full. Fill
    /// a prefix of them in order (a readv), then `commit`: blocks the commit does not reach go
    /// back at once.
    public func reserve(upTo limit: Int) -> [UnsafeMutableRawBufferPointer] {
        var wanted = min(room, limit)
        guard wanted > 0 else { return [] }
        if blocks.isEmpty { firstBlockOffset = end }
        var regions: [UnsafeMutableRawBufferPointer] = []
        var used = usedInTail
        if blocks.isEmpty || used == blockSize {
            blocks.append(storage.takeBlock(startingAt: nextBlockOffset))
            used = 0
        }
        reserved = true
        while wanted > 0 {
            let tail = blocks[blocks.count - 1]
            let take = min(blockSize - used, wanted)
            regions.append(UnsafeMutableRawBufferPointer(rebasing: tail[used..<used + take]))
            wanted -= take
            if wanted > 0 {
                blocks.append(storage.takeBlock(startingAt: nextBlockOffset))
                used = 0
            }
        }
        return regions
    }

    /// Records that the first `count` bytes of the last `reserve` were written (0 is fine).
    public func commit(_ count: Int) {
        precondition(reserved, "commit without reserve")
        precondition(count >= 0 && self.count + count <= capacity)
        reserved = false
        end += UInt64(count)
        // Blocks the reservation took but the commit did not reach.
        let needed = max(1, Int((end - firstBlockOffset + UInt64(blockSize) - 1) / UInt64(blockSize)))
        while blocks.count > needed { storage.recycleBlock(blocks.removeLast()) }
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
        return UnsafeRawBufferPointer(rebasing: blocks[index][within..<within + available])
    }

    /// The bytes from `offset` as regions in stream order, `limit` bytes in all at most, across
    /// as many blocks as they span. `offset` must lie in `[acknowledged, end)`. Pin while writing.
    public func regions(from offset: UInt64, limit: Int) -> [UnsafeRawBufferPointer] {
        var regions: [UnsafeRawBufferPointer] = []
        var position = offset
        var left = min(limit, Int(end - offset))
        while left > 0 {
            let region = bytes(from: position, limit: left)
            regions.append(region)
            position += UInt64(region.count)
            left -= region.count
        }
        return regions
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

    /// Where a block appended now starts.
    private var nextBlockOffset: UInt64 { firstBlockOffset + UInt64(blocks.count * blockSize) }

    private var usedInTail: Int {
        guard !blocks.isEmpty else { return 0 }
        return Int(end - firstBlockOffset) - (blocks.count - 1) * blockSize
    }

    /// Returns acknowledged blocks, never one that is reserved or pinned.
    private func release() {
        while !blocks.isEmpty {
            let blockEnd = firstBlockOffset + UInt64(blockSize)
            let fullyAcknowledged = blockEnd <= acknowledged
            let idleTail = blocks.count == 1 && acknowledged == end && !reserved
            guard fullyAcknowledged || idleTail else { return }
            if let pinned, pinned < blockEnd { return }
            storage.recycleBlock(blocks.removeFirst())
            firstBlockOffset = fullyAcknowledged ? blockEnd : end
        }
    }
}
