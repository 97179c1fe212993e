import Dispatch
import NIOConcurrencyHelpers
import Testing

@testable import HoldfastCore

// A shared ring's idle pages go back to the system (MADV_REMOVE: the next read of them sees
// zeros). A soak once delivered a stream of the right length whose bytes from one write on
// were wrong: the trim had picked a free block to release, a reader took that same block and
// read the process's next write into it, and only then did the release punch the pages out.

@Suite("Shared replay-ring storage")
struct SharedRingStorageTests {
    /// A region never freed: a trim the wheel schedules may still run after the test returns.
    private static func region(blockSize: Int, blockCount: Int) -> UnsafeMutableRawPointer {
        let size = SharedRingStorage.regionSize(blockSize: blockSize, blockCount: blockCount)
        let memory = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        return memory
    }

    /// The interleaving the soak hit, forced: while the trim releases a free block, another
    /// thread (the stream's reader) takes a block and fills it. What it wrote must survive —
    /// the release may not zero a block that is in use again.
    @Test func aBlockTakenWhileATrimReleasesPagesKeepsWhatIsWrittenIntoIt() throws {
        let blockSize = 4096
        let blockCount = 4
        let region = Self.region(blockSize: blockSize, blockCount: blockCount)
        let readerMayTake = DispatchSemaphore(value: 0)
        let readerFilled = DispatchSemaphore(value: 0)
        let taken = NIOLockedValueBox<Int?>(nil)  // the block's address
        let releases = NIOLockedValueBox(0)
        // The hour keeps the wheel's own trims out of the test: it calls trim() itself.
        let storage = SharedRingStorage(region: region, blockSize: blockSize, blockCount: blockCount, trimAfter: .seconds(3600)) { block in
            releases.withLockedValue { $0 += 1 }
            readerMayTake.signal()
            // Long enough for an unblocked reader to take and fill a block; a reader held off
            // until the release is over costs the test this wait.
            _ = readerFilled.wait(timeout: .now() + .milliseconds(300))
            // MADV_REMOVE's effect on the pages.
            block.initializeMemory(as: UInt8.self, repeating: 0)
        }
        storage.start(restoringUpTo: nil)
        // A block used and given back: free, its pages resident.
        let first = storage.takeBlock(startingAt: 0)
        first.initializeMemory(as: UInt8.self, repeating: 1)
        storage.recycleBlock(first)
        storage.trim()  // the ring was busy since the last look: nothing released yet
        #expect(releases.withLockedValue { $0 } == 0)

        let reader = DispatchGroup()
        DispatchQueue.global().async(group: reader) {
            readerMayTake.wait()
            let block = storage.takeBlock(startingAt: UInt64(blockSize))
            block.initializeMemory(as: UInt8.self, repeating: 0xAB)
            taken.withLockedValue { $0 = Int(bitPattern: block.baseAddress) }
            readerFilled.signal()
        }
        storage.trim()
        #expect(releases.withLockedValue { $0 } == 1, "the idle block's pages were released")
        #expect(reader.wait(timeout: .now() + .seconds(10)) == .success)
        let address = try #require(taken.withLockedValue { $0 })
        let block = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: address), count: blockSize)
        let intact = block.allSatisfy { $0 == 0xAB }
        #expect(intact, "the bytes read into a block taken during the release are what was written")
    }

    /// A departed stream's storage outlives its process (the last task holding it lets go
    /// late) while its slot's region is given to a newer stream. When it then gives back a block
    /// its ring still held and goes (`deinit`), it may neither erase the newer stream's table
    /// entries nor release pages that are now the newer stream's blocks.
    @Test func aDepartedStreamsStorageLeavesARegionANewerStreamClaimedAlone() throws {
        let blockSize = 4096
        let blockCount = 4
        let region = Self.region(blockSize: blockSize, blockCount: blockCount)
        let ownership = RegionOwnership()
        let releases = NIOLockedValueBox(0)
        func storage() -> SharedRingStorage {
            SharedRingStorage(region: region, blockSize: blockSize, blockCount: blockCount, trimAfter: .seconds(3600), claim: ownership.claim()) { block in
                releases.withLockedValue { $0 += 1 }
                block.initializeMemory(as: UInt8.self, repeating: 0)  // MADV_REMOVE's effect
            }
        }
        // The departed stream: one block given back (its pages resident), one still in its ring.
        var departed: SharedRingStorage? = storage()
        departed?.start(restoringUpTo: nil)
        let given = try #require(departed?.takeBlock(startingAt: 0))
        let held = try #require(departed?.takeBlock(startingAt: UInt64(blockSize)))
        departed?.recycleBlock(given)

        // The newer stream takes the same two blocks and fills them.
        let newer = storage()
        let restored = newer.start(restoringUpTo: nil)
        #expect(restored == nil)
        let blocks = [newer.takeBlock(startingAt: 0), newer.takeBlock(startingAt: UInt64(blockSize))]
        #expect(Set(blocks.map(\.baseAddress)) == Set([given.baseAddress, held.baseAddress]), "the newer stream was given the departed one's blocks")
        for block in blocks { block.initializeMemory(as: UInt8.self, repeating: 0xCD) }

        // The departed stream's ring lets go late, then its storage goes.
        departed?.recycleBlock(held)
        departed = nil
        #expect(releases.withLockedValue { $0 } == 0, "no page of the region was released by the stream that left it")
        for block in blocks {
            #expect(block.allSatisfy { $0 == 0xCD }, "the newer stream's bytes are intact")
        }
        // A successor of the newer stream (its broker crashed) finds both blocks in the table.
        let successor = storage()
        let ring = try #require(successor.start(restoringUpTo: UInt64(2 * blockSize)))
        #expect(ring.start == 0 && ring.end == UInt64(2 * blockSize))
        #expect(ring.blocks.map(\.baseAddress) == blocks.map(\.baseAddress), "the newer stream's table entries are intact")
        _ = newer
    }

    /// Clearing a slot for its next process (`RingMemory.clear`) revokes every claim made
    /// before it: what an earlier storage does after that touches nothing.
    @Test func aRevokedClaimWritesNothing() {
        let ownership = RegionOwnership()
        let first = ownership.claim()
        #expect(first.isCurrent)
        var cleared = false
        ownership.revoke { cleared = true }
        #expect(cleared && !first.isCurrent)
        #expect(first.whileCurrent { Issue.record("a revoked claim ran a write") } == false)
        let second = ownership.claim()
        #expect(second.whileCurrent {} && !first.isCurrent)
    }
}
