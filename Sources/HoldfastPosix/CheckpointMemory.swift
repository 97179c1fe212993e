import CHoldfastShims
import HoldfastCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A memfd mapped MAP_SHARED: memory that outlives the process writing it as long as another
/// holds the fd. The supervisor creates it; every broker it starts inherits the fd and maps it,
/// so what a broker wrote there is still readable after it was killed.
///
/// The mapping is sparse: the memfd is sized with ftruncate, and only the pages written cost
/// memory.
public final class SharedMemory: @unchecked Sendable {
    /// The memfd (close-on-exec; a child that must inherit it is told to keep it).
    public let descriptor: Int32
    public let size: Int
    public let base: UnsafeMutableRawPointer

    private init(descriptor: Int32, size: Int, base: UnsafeMutableRawPointer) {
        self.descriptor = descriptor
        self.size = size
        self.base = base
    }

    deinit {
        munmap(base, size)
        close(descriptor)
    }

    /// A new memfd of `size` bytes, zero-filled, mapped read-write.
    public static func create(name: String, size: Int) throws(SystemError) -> SharedMemory {
        precondition(size > 0, "shared memory of no bytes")
        let fd = hf_memfd_create(name)
        guard fd >= 0 else { throw .last("memfd_create(\(name))") }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let error = SystemError.last("ftruncate(memfd, \(size))")
            close(fd)
            throw error
        }
        return try map(fd, size: size)
    }

    /// Maps an inherited memfd, its size read with fstat: `fd` is owned from then on. On a
    /// failure it stays open, the caller's: a live upgrade's new image that cannot map it falls
    /// back to the previous one, which needs it (closed, the streams' progress was gone).
    public static func inherit(_ fd: Int32) throws(SystemError) -> SharedMemory {
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw .last("fstat(\(fd))") }
        guard info.st_size > 0 else {
            throw SystemError("shared memory fd \(fd) has no bytes", errno: .init(rawValue: EINVAL))
        }
        // Close-on-exec from here on: nothing the inheritor starts gets it.
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return try map(fd, size: Int(info.st_size), closingOnFailure: false)
    }

    private static func map(_ fd: Int32, size: Int, closingOnFailure: Bool = true) throws(SystemError) -> SharedMemory {
        let address = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        // MAP_FAILED is (void *)-1, a macro Swift does not import.
        guard let address, address != UnsafeMutableRawPointer(bitPattern: -1) else {
            let error = SystemError.last("mmap(memfd, \(size))")
            if closingOnFailure { close(fd) }
            throw error
        }
        return SharedMemory(descriptor: fd, size: size, base: address)
    }
}

/// Slots for `StreamCheckpoint`s in shared memory: where resumable streams keep their progress
/// so a broker started after a crash resumes them (docs/ARCHITECTURE.md, "Surviving a broker
/// crash"). The supervisor allocates the slots and names them in adopt requests.
public final class CheckpointMemory: Sendable {
    public let memory: SharedMemory
    public var slotCount: Int { memory.size / StreamCheckpoint.slotSize }
    public var descriptor: Int32 { memory.descriptor }

    /// 65,536 slots (4 MiB of address space, touched a page at a time).
    public static let defaultSlotCount = 65_536

    public init(memory: SharedMemory) {
        self.memory = memory
    }

    /// A new area of `slots` slots (the supervisor's).
    public static func create(slots: Int = CheckpointMemory.defaultSlotCount) throws(SystemError) -> CheckpointMemory {
        CheckpointMemory(memory: try SharedMemory.create(name: "holdfast-checkpoints", size: slots * StreamCheckpoint.slotSize))
    }

    /// The area an inherited fd names (the broker's).
    public static func inherit(_ fd: Int32) throws(SystemError) -> CheckpointMemory {
        CheckpointMemory(memory: try SharedMemory.inherit(fd))
    }

    /// The checkpoint in `slot`; nil when the area has no such slot.
    /// The slots a broker gives the streams a handoff peer hands it (it deposits them with the
    /// supervisor, which never allocates these): the top quarter of the slots that have a ring.
    public static let handoffSlots = (RingMemory.defaultSlotCount * 3 / 4)..<RingMemory.defaultSlotCount

    public func checkpoint(_ slot: Int) -> StreamCheckpoint? {
        guard slot >= 0, slot < slotCount else { return nil }
        return StreamCheckpoint(slot: memory.base + slot * StreamCheckpoint.slotSize)
    }
}

/// The replay rings of output streams in shared memory, one region per checkpoint slot
/// (`SharedRingStorage`): what a killed broker's rings held is still there for the next one,
/// so a crash costs no byte the host had not received — only, at most, one interrupted read.
/// The supervisor creates it (sparse: a region costs memory only while its ring holds bytes,
/// and an idle ring's pages are released) and hands it to every broker.
public final class RingMemory: Sendable {
    public let memory: SharedMemory
    public let blockSize: Int
    public let blockCount: Int
    public let regionSize: Int
    public var slotCount: Int { memory.size / regionSize }
    public var descriptor: Int32 { memory.descriptor }
    /// Each slot's owner in this process: the stream whose storage was made last (made on first
    /// use, kept: at most one small object per slot).
    private let owners = Mutex<[Int: RegionOwnership]>([:])

    /// Slots with a ring (a checkpoint slot beyond them gets a heap ring: lost in a crash, and
    /// reported as such).
    public static let defaultSlotCount = 16_384

    init(memory: SharedMemory, capacity: Int, blockSize: Int) {
        self.memory = memory
        self.blockSize = blockSize
        self.blockCount = SharedRingStorage.blockCount(capacity: capacity, blockSize: blockSize)
        self.regionSize = SharedRingStorage.regionSize(blockSize: blockSize, blockCount: blockCount)
    }

    /// A new area for rings of `capacity` bytes (the supervisor's).
    public static func create(capacity: Int, blockSize: Int, slots: Int = RingMemory.defaultSlotCount) throws(SystemError) -> RingMemory {
        let count = SharedRingStorage.blockCount(capacity: capacity, blockSize: blockSize)
        let size = slots * SharedRingStorage.regionSize(blockSize: blockSize, blockCount: count)
        return RingMemory(memory: try SharedMemory.create(name: "holdfast-rings", size: size), capacity: capacity, blockSize: blockSize)
    }

    /// The area an inherited fd names (the broker's), for rings of `capacity` bytes: the same
    /// layout as the supervisor's, computed from the same settings.
    public static func inherit(_ fd: Int32, capacity: Int, blockSize: Int) throws(SystemError) -> RingMemory {
        RingMemory(memory: try SharedMemory.inherit(fd), capacity: capacity, blockSize: blockSize)
    }

    /// The ring storage of `slot`; nil when the area has no such slot.
    public func storage(_ slot: Int) -> SharedRingStorage? {
        guard slot >= 0, slot < slotCount else { return nil }
        // The new stream's claim makes any earlier storage of the slot stale: a departed
        // stream's storage still alive must not release this one's pages.
        let claim = owner(of: slot).claim()
        return SharedRingStorage(region: memory.base + slot * regionSize, blockSize: blockSize, blockCount: blockCount, claim: claim) { block in
            // The pages go back to the system; the next use faults in zeroed ones.
            _ = madvise(block.baseAddress, block.count, MADV_REMOVE)
        }
    }

    /// Releases every page of `slot`'s region (its process is gone: nothing will read it).
    public func clear(_ slot: Int) {
        guard slot >= 0, slot < slotCount else { return }
        // No storage made before this touches the region again.
        owner(of: slot).revoke { _ = madvise(memory.base + slot * regionSize, regionSize, MADV_REMOVE) }
    }

    private func owner(of slot: Int) -> RegionOwnership {
        owners.withLock { owners in
            if let owner = owners[slot] { return owner }
            let owner = RegionOwnership()
            owners[slot] = owner
            return owner
        }
    }
}
