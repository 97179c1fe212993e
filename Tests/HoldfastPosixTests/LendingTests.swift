import HoldfastCore
import HoldfastTestSupport
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// Page-aligned memory, as a lending ring's blocks are.
private func pages(_ count: Int) -> UnsafeMutableRawBufferPointer {
    UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
}

/// The inode of the pipe `fd` is an end of ("pipe:[N]" in /proc/self/fd), or nil.
private func pipeInode(_ fd: Int32) -> String? {
    var buffer = [CChar](repeating: 0, count: 256)
    let count = readlink("/proc/self/fd/\(fd)", &buffer, buffer.count - 1)
    guard count > 0 else { return nil }
    let link = String(decoding: buffer[..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return link.hasPrefix("pipe:") ? link : nil
}

/// Whether any fd of this process is an end of the pipe `inode`.
private func processHolds(_ inode: String) -> Bool {
    guard let directory = opendir("/proc/self/fd") else { return false }
    defer { closedir(directory) }
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if let fd = Int32(name), pipeInode(fd) == inode { return true }
    }
    return false
}

@Suite("Lending a resumable ring's pages to its socket (vmsplice, then splice)", .timeLimit(.minutes(2)))
struct LendingTests {
    @Test func lentAndCopiedVectorsArriveInOrderAndThePipeGoesWithTheSocket() async throws {
        let (near, far) = try socketPair()
        defer { far.close() }
        // 3 MiB in pieces of every shape: page-aligned and not, smaller than a page and larger
        // than the pipe (256 KiB), each lent piece after a 16-byte header that is copied.
        let total = 3 << 20
        let memory = pages(total)
        defer { memory.deallocate() }
        memory.copyBytes(from: pattern(0..<total))
        let header = pages(4096)
        defer { header.deallocate() }
        var vectors: [UnsafeRawBufferPointer] = []
        var lent: [Bool] = []
        var expected: [UInt8] = []
        var offset = 0
        var size = 1
        var index = 0
        while offset < total {
            let take = min(size, total - offset)
            let headerBytes = UnsafeMutableRawBufferPointer(rebasing: header[(index % 200) * 16..<(index % 200) * 16 + 16])
            headerBytes.copyBytes(from: pattern(1_000_000 + index * 16..<1_000_000 + index * 16 + 16))
            vectors.append(UnsafeRawBufferPointer(headerBytes))
            lent.append(false)
            expected += Array(headerBytes)
            vectors.append(UnsafeRawBufferPointer(rebasing: memory[offset..<offset + take]))
            lent.append(true)
            expected += Array(memory[offset..<offset + take])
            offset += take
            size = size * 3 + 4093  // 1, 4096, 16381, 53236, 163801, 495496, 1490581, ...
            index += 1
        }
        // A reader slower than the writer: the socket fills, the write waits for room.
        let reader = Task { try await readExactly(far, expected.count) }
        try await near.write(vectors: vectors, lent: lent)
        let pipe = try #require(near.lending.withLockedValue { $0.pipe }, "a socket that lent holds its pipe")
        let inode = try #require(pipeInode(pipe.read))
        #expect(try await reader.value == expected)
        near.close()
        #expect(!processHolds(inode), "the pipe is closed with the socket")
    }

    @Test func lentPagesGoByReferenceCopiedOnesByValue() async throws {
        // A lent page is read as it is when the peer reads it: what makes lending zero-copy,
        // and why a ring lends only bytes it keeps unchanged until they are acknowledged.
        for lend in [true, false] {
            let (near, far) = try socketPair()
            defer { [near, far].forEach { $0.close() } }
            let memory = pages(64 * 1024)
            defer { memory.deallocate() }
            memory.copyBytes(from: [UInt8](repeating: 0x41, count: memory.count))
            // Two pieces: each batch the sender lends is at least this size; the socket holds them.
            let vectors = [UnsafeRawBufferPointer(rebasing: memory[..<32768]), UnsafeRawBufferPointer(rebasing: memory[32768...])]
            try await near.write(vectors: vectors, lent: [lend, lend])
            memory.copyBytes(from: [UInt8](repeating: 0x42, count: memory.count))
            let got = try await readExactly(far, memory.count)
            #expect(got == [UInt8](repeating: lend ? 0x42 : 0x41, count: memory.count), lend ? "lent pages go by reference" : "copied bytes go by value")
        }
    }

    @Test func anIdleSocketGivesItsPipeBackAndLendsAgainLater() async throws {
        let (near, far) = try socketPair()
        defer { [near, far].forEach { $0.close() } }
        let memory = pages(128 * 1024)
        defer { memory.deallocate() }
        memory.copyBytes(from: pattern(0..<memory.count))
        try await near.write(vectors: [UnsafeRawBufferPointer(memory)], lent: [true])
        #expect(try await readExactly(far, memory.count) == Array(memory))
        let inode = try #require(near.lending.withLockedValue { $0.pipe }.flatMap { pipeInode($0.read) })
        // The idle timer's two looks (the first after the write, the second after nothing).
        near.trimLendingPipe()
        #expect(near.holdsLendingPipe, "lent since the last look: kept")
        near.trimLendingPipe()
        #expect(!near.holdsLendingPipe)
        #expect(!processHolds(inode), "an idle pipe is closed")
        // The next lending write makes a new one.
        try await near.write(vectors: [UnsafeRawBufferPointer(memory)], lent: [true])
        #expect(try await readExactly(far, memory.count) == Array(memory))
        #expect(near.holdsLendingPipe)
    }

    @Test func aPipeCopiesAndAFailedWriteLeavesNothingBehind() async throws {
        // Not a socket: the same call copies.
        let ends = try PipeEnds.make()
        let reader = try AsyncFD(adopting: ends.read)
        let writer = try AsyncFD(adopting: ends.write)
        defer { [reader, writer].forEach { $0.close() } }
        let memory = pages(40_000)
        defer { memory.deallocate() }
        memory.copyBytes(from: pattern(0..<memory.count))
        try await writer.write(vectors: [UnsafeRawBufferPointer(memory)], lent: [true])
        #expect(try await readExactly(reader, memory.count) == Array(memory))
        #expect(!writer.holdsLendingPipe)

        // A peer that goes away mid-write: the failure counts what the socket accepted, and the
        // pipe that may hold the rest is gone at once.
        let (near, far) = try socketPair()
        defer { near.close() }
        let big = pages(4 << 20)
        defer { big.deallocate() }
        nonisolated(unsafe) let bigBytes = UnsafeRawBufferPointer(big)  // outlives the task (awaited below)
        let writing = Task { () -> WriteFailure? in
            do throws(WriteFailure) {
                try await near.write(vectors: [bigBytes], lent: [true])
                return nil
            } catch {
                return error
            }
        }
        let taken = try await readExactly(far, 100_000).count
        far.close()
        let failure = try #require(await writing.value, "a write to a closed peer fails")
        #expect(failure.accepted >= taken && failure.accepted < big.count)
        #expect(!near.holdsLendingPipe)
    }
}
