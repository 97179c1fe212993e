import HoldfastCore
import HoldfastTestSupport
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// A page of memory no syscall may touch until `open` (`mprotect`): a read into it, or a write
/// from it, fails EFAULT — what the kernel answers when it cannot fault one of our pages in
/// inside the call (a replay-ring block given back and used again, under a memory limit).
private final class ClosedPage: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let size = Int(sysconf(Int32(_SC_PAGESIZE)))

    init(filledWith byte: UInt8) throws {
        let mapped = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let mapped, mapped != MAP_FAILED else { throw SystemError.last("mmap") }
        base = mapped
        memset(base, Int32(byte), size)
        guard mprotect(base, size, PROT_NONE) == 0 else { throw SystemError.last("mprotect") }
    }

    var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: size) }

    func open() { mprotect(base, size, PROT_READ | PROT_WRITE) }

    deinit { munmap(base, size) }
}

/// A read or write the kernel refuses for want of memory (ENOMEM charging a pipe page, ENOBUFS
/// for a socket buffer, EFAULT faulting one of our pages in) is neither the stream's end nor the
/// process's. Before, the relays took any such failure for one: a stdout got its END while its
/// process still wrote (the next write a SIGPIPE: output lost), a stdin was closed under its
/// reader. Now the call is made again after `AsyncFD.shortageRetry`, and the bytes wait where
/// they were. Real EFAULTs here (a page closed with mprotect), and injected ones on the paths a
/// page cannot reach (a window's splice, a stage).
@Suite("A kernel short of memory for a moment is not a stream's end", .timeLimit(.minutes(1)))
struct ShortageTests {
    @Test func aReadRefusedForWantOfMemoryLeavesTheBytesAndWakesItsReaderAgain() async throws {
        let pipe = try PipeEnds.make()
        let reader = try AsyncFD(adopting: pipe.read)
        let writer = try AsyncFD(adopting: pipe.write)
        defer { [reader, writer].forEach { $0.close() } }
        let sent = pattern(0..<1000)
        try await send(writer, sent)
        // Watched, as a relay's reader is, with the bytes' readiness counted: no edge comes
        // again for them.
        try await reader.waitForReadEdge(after: reader.registrationEdges(.read))
        let page = try ClosedPage(filledWith: 0)
        let before = AsyncFD.shortagesWaitedOut
        #expect(try reader.readNow(into: page.bytes) == nil, "nothing read, and no failure")
        #expect(reader.lastReadFoundShortage)
        #expect(reader.shortagesWaitedOutHere == 1)
        #expect(AsyncFD.shortagesWaitedOut > before, "counted for the metric")
        // No byte arrives after it: only the retry's wake-up ends this wait.
        try await withDeadline("the reader woken again for the retry", .seconds(10)) { try await reader.waitReadable() }
        page.open()
        let count = try #require(try reader.readNow(into: page.bytes))
        #expect(!reader.lastReadFoundShortage)
        #expect(Array(page.bytes[..<count]) == sent, "the bytes waited in the pipe, whole")
    }

    @Test func aWriteRefusedForWantOfMemoryWaitsAndGoesOnWithTheSameBytes() async throws {
        let pipe = try PipeEnds.make()
        let reader = try AsyncFD(adopting: pipe.read)
        let writer = try AsyncFD(adopting: pipe.write)
        defer { [reader, writer].forEach { $0.close() } }
        let page = try ClosedPage(filledWith: 0x5A)
        let written = Task { try await writer.write(UnsafeRawBufferPointer(page.bytes)) }
        try await eventually("the write refused a few times") { writer.shortagesWaitedOutHere >= 2 }
        let probe = UnsafeMutableRawBufferPointer.allocate(byteCount: 1, alignment: 1)
        defer { probe.deallocate() }
        #expect(try reader.readNow(into: probe) == nil, "nothing written meanwhile")
        page.open()
        try await withDeadline("the write done once the page is back", .seconds(10)) { try await written.value }
        let received = try await readExactly(reader, page.size)
        #expect(received == [UInt8](repeating: 0x5A, count: page.size), "every byte once")
    }

    /// A window holding bytes whose read is refused keeps its level (what a successor settles a
    /// crash by) and is read again: before, its level was reset to 0 as for an empty window, and
    /// its bytes were not read until the process wrote again.
    @Test func aWindowWhoseReadIsRefusedKeepsItsLevelAndIsReadAgain() async throws {
        let process = try PipeEnds.make()
        let window = try makeWindow()
        let reader = try AsyncFD(adopting: process.read)
        let writer = try AsyncFD(adopting: process.write)
        defer { [reader, writer].forEach { $0.close() }; window.close() }
        let held = pattern(0..<10_000)
        try await send(window.write, held)
        let source = WindowedSource(source: reader, window: window, level: try window.level())
        window.read.injectShortages(3)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 16)
        defer { buffer.deallocate() }
        var received: [UInt8] = []
        var refused = 0
        // Bounded: without the level kept, the window's bytes are never read again here.
        for _ in 0..<20 where received.count < held.count {
            if case .holding(let level) = try source.fillWindow(upTo: buffer.count) {
                #expect(level == held.count - received.count, "the level kept through each refusal")
            }
            guard let count = try source.readNow(into: [buffer]) else {
                refused += 1
                try await source.waitReadable()
                continue
            }
            received += buffer[..<count]
        }
        #expect(refused == 3)
        #expect(received == held, "the window's bytes, once")
        #expect(try window.level() == 0)
    }

    /// A file epoll cannot watch (a regular file: always ready) whose read is refused waits for
    /// the retry like any fd. Its wait returned at once: the relay spun on the refusal on the
    /// reactor's thread for as long as the shortage lasted, starting a timer task each turn.
    @Test func anAlwaysReadyFileWhoseReadIsRefusedWaitsForTheRetry() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.file("data")
        let written = pattern(0..<5000)
        try writeFile(path, written)
        let file = try AsyncFD(adopting: open(path, O_RDONLY | O_CLOEXEC))
        defer { file.close() }
        file.injectShortages(3)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 8192, alignment: 1)
        defer { buffer.deallocate() }
        let began = ContinuousClock.now
        let count = try await file.read(into: buffer)
        // A lower bound, which no load can break: three refusals are three waits of 100 ms.
        #expect(ContinuousClock.now - began >= .milliseconds(250), "waited for each retry")
        #expect(file.shortagesWaitedOutHere == 3)
        #expect(Array(buffer[..<count]) == written)
    }

    /// An empty stage the kernel refuses memory for: the bytes go in once it has some. Before:
    /// "no room in an empty stage", and the stdin was ended.
    @Test func aStageRefusedForWantOfMemoryTakesTheBytesWhenItCan() async throws {
        let process = try PipeEnds.make()
        let stage = try makeWindow()
        let sink = try AsyncFD(adopting: process.write)
        let reader = try AsyncFD(adopting: process.read)
        defer { [sink, reader].forEach { $0.close() }; stage.close() }
        let staging = StagingSink(sink: sink, stage: stage, level: 0)
        stage.write.injectShortages(2)
        sink.injectShortages(2)
        let typed = pattern(0..<3000)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: typed.count, alignment: 1)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: typed)
        try await staging.write(UnsafeRawBufferPointer(buffer))
        #expect(staging.staged == 0)
        #expect(try await readExactly(reader, typed.count) == typed, "every byte once, in order")
    }

    /// A stage emptied through a buffer (a sink it is not spliced into: a handed-over socket,
    /// or a terminal before Linux 6.5) whose read is refused keeps its level and moves its bytes
    /// once it can. Its level was set to 0, as for a stage found empty: the bytes stayed in it,
    /// counted delivered, and never reached the process.
    @Test func aStageReadThroughABufferWhoseReadIsRefusedKeepsItsBytes() async throws {
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
        let stage = try makeWindow()
        // A runtime's socket, never spliced into (a splice could wait on it): the stage is
        // emptied through a buffer, whose read of the stage the shortage hits.
        let sink = try AsyncFD(adopting: pair[0], foreignDescription: true)
        let process = try AsyncFD(adopting: pair[1])
        defer { [sink, process].forEach { $0.close() }; stage.close() }
        let staging = StagingSink(sink: sink, stage: stage, level: 0)
        let typed = Array("typed into a socket\n".utf8)
        stage.read.injectShortages(2)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: typed.count, alignment: 1)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: typed)
        try await staging.write(UnsafeRawBufferPointer(buffer))
        #expect(staging.staged == 0)
        #expect(stage.read.shortagesWaitedOutHere == 2, "the buffer's reads were refused")
        #expect(try await readExactly(process, typed.count) == typed, "every byte, once")
    }
}
