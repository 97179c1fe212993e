import NIOConcurrencyHelpers

/// One output stream's replay-ring blocks in memory that outlives its relay (a region of the
/// supervisor's ring memfd), laid out so a successor can read back what the ring held when the
/// relay was killed (docs/ARCHITECTURE.md, "Surviving a broker crash").
///
/// The region: a table of one 64-bit word per block — 0 for a free block, else 1 + the stream
/// offset of its first byte, written when the ring takes the block (before any byte goes in) and
/// cleared when it gives it back — then the blocks. A ring's blocks are contiguous in the stream
/// (block k starts `k × blockSize` after the first), so the bytes before the checkpoint's offset
/// are found by walking back from the block that holds its last byte. A stale entry (a crash
/// between giving a block back and clearing it) names bytes the block still holds: a block is
/// written only after it was taken again, and taking it rewrites its entry first.
///
/// Pages of blocks given back are released (`release`, madvise MADV_REMOVE in the broker) once
/// the ring has not needed them for `trimAfter`: a busy stream keeps reusing its resident blocks,
/// an idle one holds none.
///
/// A storage made with a `claim` on its region writes the region's table and releases its
/// pages only while that claim is the region's newest (`RegionOwnership`): a departed
/// stream's storage can outlive its process, and its region may already be a newer stream's.
public final class SharedRingStorage: RingBlockStorage, @unchecked Sendable {
    public let blockSize: Int
    public let blockCount: Int
    private let table: UnsafeMutablePointer<UInt64>
    private let blocks: UnsafeMutableRawPointer
    private let release: @Sendable (UnsafeMutableRawBufferPointer) -> Void
    private let trimAfter: Duration
    private let claim: RegionOwnership.Claim?
    private let state: NIOLockedValueBox<State>

    private struct State {
        /// Free blocks, most recently used last (taken first: they are resident).
        var free: [Int]
        /// Free blocks whose pages are still resident.
        var resident: Set<Int> = []
        var trimScheduled = false
        /// A block was taken since the last trim: the ring is busy.
        var usedSinceTrim = false
    }

    /// The bytes a region of `blockCount` blocks of `blockSize` needs (table page-aligned).
    public static func regionSize(blockSize: Int, blockCount: Int) -> Int {
        tableSize(blockCount: blockCount) + blockSize * blockCount
    }

    static func tableSize(blockCount: Int) -> Int {
        (blockCount * 8 + 4095) / 4096 * 4096
    }

    /// The blocks a ring of `capacity` can hold at once: full ones, a partly acknowledged head and
    /// a partly filled tail.
    public static func blockCount(capacity: Int, blockSize: Int) -> Int {
        (capacity + blockSize - 1) / blockSize + 2
    }

    /// - Parameter region: `regionSize(...)` bytes, page-aligned, zero when never used.
    public init(
        region: UnsafeMutableRawPointer, blockSize: Int, blockCount: Int, trimAfter: Duration = .seconds(2),
        claim: RegionOwnership.Claim? = nil, release: @escaping @Sendable (UnsafeMutableRawBufferPointer) -> Void
    ) {
        self.blockSize = blockSize
        self.blockCount = blockCount
        self.table = region.bindMemory(to: UInt64.self, capacity: blockCount)
        self.blocks = region + Self.tableSize(blockCount: blockCount)
        self.release = release
        self.trimAfter = trimAfter
        self.claim = claim
        self.state = NIOLockedValueBox(State(free: []))
    }

    deinit {
        // The stream is done (its ring gave every block back): nothing of it stays resident —
        // unless its region is a newer stream's by now, whose blocks these pages may be.
        let resident = state.withLockedValue { $0.resident }
        whileOwner { for index in resident { release(block(index)) } }
    }

    /// Runs `body` (a write to the region's table or a release of its pages) if the region is
    /// still this storage's.
    @discardableResult
    private func whileOwner(_ body: () -> Void) -> Bool {
        guard let claim else {
            body()
            return true
        }
        return claim.whileCurrent(body)
    }

    private func block(_ index: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: blocks + index * blockSize, count: blockSize)
    }

    private func index(of block: UnsafeMutableRawBufferPointer) -> Int {
        let index = (block.baseAddress! - blocks) / blockSize
        precondition(index >= 0 && index < blockCount && blocks + index * blockSize == block.baseAddress!, "not a block of this storage")
        return index
    }

    /// Starts the storage for a new stream (every block free) — or, when `taken` is given, for
    /// a stream resumed after its relay died: the blocks that hold the bytes just before `taken`
    /// (contiguous, walking back from the one holding byte `taken − 1`) become the restored ring;
    /// every other block is free. Returns that ring (empty, at `taken`, when no block holds it).
    @discardableResult
    public func start(restoringUpTo taken: UInt64?) -> RestoredRing? {
        var held: [Int: UInt64] = [:]
        for index in 0..<blockCount where table[index] != 0 { held[index] = table[index] - 1 }
        var chain: [Int] = []
        var restored: RestoredRing?
        if let taken {
            let byStart = Dictionary(held.map { ($0.value, $0.key) }, uniquingKeysWith: { first, _ in first })
            var start: UInt64?
            if taken > 0 {
                // The block holding byte taken − 1: the one whose start is the greatest ≤ it.
                let last = held.filter { $0.value <= taken - 1 && taken - 1 < $0.value + UInt64(blockSize) }.max { $0.value < $1.value }
                if let last {
                    chain = [last.key]
                    start = last.value
                    while let first = start, first >= UInt64(blockSize), let previous = byStart[first - UInt64(blockSize)] {
                        chain.insert(previous, at: 0)
                        start = first - UInt64(blockSize)
                        if chain.count == blockCount { break }
                    }
                }
            }
            restored = RestoredRing(blocks: chain.map(block), start: start ?? taken, end: taken)
        }
        let inRing = Set(chain)
        for index in 0..<blockCount where !inRing.contains(index) { table[index] = 0 }
        state.withLockedValue { s in
            s.free = (0..<blockCount).filter { !inRing.contains($0) }.reversed()
            // Whatever a predecessor touched may be resident: the first trim releases it.
            s.resident = Set(s.free.filter { held[$0] != nil })
        }
        if !state.withLockedValue({ $0.resident.isEmpty }) { scheduleTrim() }
        return restored
    }

    public func takeBlock() -> UnsafeMutableRawBufferPointer {
        preconditionFailure("a shared ring's block is always taken with its offset")
    }

    public func takeBlock(startingAt offset: UInt64) -> UnsafeMutableRawBufferPointer {
        let index = state.withLockedValue { s -> Int in
            guard let index = s.free.popLast() else {
                preconditionFailure("a ring took more than its \(blockCount) blocks")
            }
            s.resident.remove(index)
            s.usedSinceTrim = true
            return index
        }
        whileOwner { table[index] = offset + 1 }
        return block(index)
    }

    public func recycleBlock(_ block: UnsafeMutableRawBufferPointer) {
        let index = index(of: block)
        let owner = whileOwner { table[index] = 0 }
        let schedule = state.withLockedValue { s -> Bool in
            s.free.append(index)
            // A block of a region that is no longer ours is not ours to release either.
            guard owner else { return false }
            s.resident.insert(index)
            guard !s.trimScheduled else { return false }
            s.trimScheduled = true
            return true
        }
        if schedule { scheduleTrim(alreadyMarked: true) }
    }

    private func scheduleTrim(alreadyMarked: Bool = false) {
        if !alreadyMarked {
            let first = state.withLockedValue { s -> Bool in
                defer { s.trimScheduled = true }
                return !s.trimScheduled
            }
            guard first else { return }
        }
        TimeoutWheel.shared.schedule(after: trimAfter) { [weak self] in self?.trim() }
    }

    /// Releases the pages of the free blocks — unless the ring took a block since the last trim
    /// (it is busy: they will be used again soon), in which case it looks again later.
    ///
    /// The pages are released under the lock `takeBlock` takes: a block released outside it
    /// could be taken, and filled from the process's pipe, between the choice and the release,
    /// which then zeroed those bytes — a stream of the right length with a run of zeros where a
    /// write should be (seen once in a soak). The reader waits at most the few madvise calls.
    func trim() {
        let again = state.withLockedValue { s -> Bool in
            if s.usedSinceTrim {
                s.usedSinceTrim = false
                return true
            }
            s.trimScheduled = false
            whileOwner { for index in s.resident { release(block(index)) } }
            s.resident.removeAll()
            return false
        }
        if again { TimeoutWheel.shared.schedule(after: trimAfter) { [weak self] in self?.trim() } }
    }
}
