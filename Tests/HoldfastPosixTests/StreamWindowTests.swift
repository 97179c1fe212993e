import HoldfastCore
import HoldfastProtocol
import HoldfastTestSupport
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// A window made of a real pipe, as the broker holds it.
func makeWindow(capacity: Int? = nil) throws -> WindowEnds {
    let pipe = try PipeEnds.make(capacity: capacity)
    return WindowEnds(read: try AsyncFD(adopting: pipe.read), write: try AsyncFD(adopting: pipe.write))
}

/// Reads `source` until end-of-file the way the resumable relay does: `fillWindow`, then a read.
/// A pty master's EIO once its last slave closed is its end-of-file.
private func drainThroughWindow(_ source: WindowedSource) async throws -> [UInt8] {
    var received: [UInt8] = []
    do {
        try await drainThroughWindow(source, into: &received)
    } catch let error as SystemError where error.errno == .ioError {}
    return received
}

private func drainThroughWindow(_ source: WindowedSource, into received: inout [UInt8]) async throws {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 16)
    defer { buffer.deallocate() }
    while true {
        switch try source.fillWindow(upTo: buffer.count) {
        case .holding(let level):
            #expect(level > 0)
            let count = try #require(try source.readNow(into: [buffer]))
            #expect(count == min(level, buffer.count), "a read empties what the window holds, up to the buffer")
            received += buffer[..<count]
        case .nothing:
            try await source.waitReadable()
        case .endOfFile:
            return
        case .unwindowed:
            Issue.record("this kernel splices from a pipe and a pty")
            return
        }
    }
}

@Suite("Stream windows: pipes the supervisor holds between a process and the broker", .timeLimit(.minutes(2)))
struct StreamWindowTests {
    /// Output: every byte the process wrote passes through the window into the reads, in order;
    /// bytes a crashed broker left in the window come first.
    @Test func anOutputPassesThroughItsWindowAndWhatThePredecessorLeftComesFirst() async throws {
        let process = try PipeEnds.make()
        let window = try makeWindow()
        let writer = try AsyncFD(adopting: process.write)
        let reader = try AsyncFD(adopting: process.read)
        defer { [writer, reader].forEach { $0.close() }; window.close() }
        // The predecessor spliced 10,000 bytes into the window and died before reading them.
        let all = pattern(0..<600_000)
        try await send(window.write, Array(all[..<10_000]))
        #expect(try window.level() == 10_000)
        let source = WindowedSource(source: reader, window: window, level: try window.level())
        let producer = writeInBackground(writer, Array(all[10_000...]), thenClose: true)
        let received = try await drainThroughWindow(source)
        try await producer.value
        #expect(received.count == all.count)
        #expect(received.elementsEqual(all), "every byte once, in order, the window's first")
        #expect(try window.level() == 0)
    }

    /// A terminal's output goes through its window too (splice from a pty master: Linux 6.5+).
    @Test func aTerminalsOutputPassesThroughItsWindow() async throws {
        let terminal = try PseudoTerminal.open()
        try Terminal.makeRaw(fd: terminal.slave)
        let master = try AsyncFD(adopting: terminal.master)
        let slave = try AsyncFD(adopting: terminal.slave)
        let window = try makeWindow()
        defer { [master, slave].forEach { $0.close() }; window.close() }
        let source = WindowedSource(source: master, window: window, level: 0)
        let sent = pattern(0..<100_000)
        let producer = writeInBackground(slave, sent, thenClose: true)
        let started = ContinuousClock.now
        let received = try await drainThroughWindow(source)
        try await producer.value
        #expect(received.count == sent.count)
        #expect(received.elementsEqual(sent), "every byte once, in order")
        print("a terminal's 100,000 bytes through its window in \(ContinuousClock.now - started)")
    }

    /// stdin: what is staged reaches the process in order, what a crashed predecessor left in
    /// the stage first, and the stage is empty after each write.
    @Test func anInputIsStagedThenMovedOnAndWhatThePredecessorStagedGoesFirst() async throws {
        let process = try PipeEnds.make()
        let stage = try makeWindow()
        let writer = try AsyncFD(adopting: process.write)
        let reader = try AsyncFD(adopting: process.read)
        defer { [writer, reader].forEach { $0.close() }; stage.close() }
        let all = pattern(0..<300_000)
        try await send(stage.write, Array(all[..<5_000]))
        let sink = StagingSink(sink: writer, stage: stage, level: try stage.level())
        #expect(sink.staged == 5_000)
        let consumer = Task { () -> [UInt8] in
            var got: [UInt8] = []
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)
            defer { buffer.deallocate() }
            while got.count < all.count {
                let count = try await reader.read(into: buffer)
                if count == 0 { break }
                got += buffer[..<count]
            }
            return got
        }
        try await sink.flushStage()
        let rest = UnsafeMutableRawBufferPointer.allocate(byteCount: all.count - 5_000, alignment: 16)
        defer { rest.deallocate() }
        rest.copyBytes(from: all[5_000...])
        try await sink.write(UnsafeRawBufferPointer(rest))
        let level = try stage.level()
        #expect(sink.staged == 0 && level == 0)
        let got = try await consumer.value
        #expect(got.count == all.count && got.elementsEqual(all), "every byte once, in order, the stage's first")
    }

    /// The stage's level after a write into it says how much the write took: what a successor
    /// settles an interrupted write by. A process that stopped reading fails the move on.
    ///
    /// A test in the same process that forks while this one closes the reader holds a copy of it
    /// until its child execs (close-on-exec): then the move goes through, into that copy. Such a
    /// round is run again, with new pipes, up to three times (a full suite saw it once).
    @Test func aStagesLevelCountsWhatWentInAndAGoneProcessFailsTheMoveOn() async throws {
        for round in 1...3 {
            let process = try PipeEnds.make()
            let stage = try makeWindow()
            let writer = try AsyncFD(adopting: process.write)
            defer { writer.close(); stage.close() }
            let sink = StagingSink(sink: writer, stage: stage, level: 0)
            let staged = try pattern(0..<3000).withUnsafeBytes { try sink.stage($0) }
            let level = try stage.level()
            #expect(staged == 3000 && sink.staged == 3000 && level == 3000)
            close(process.read)  // the process is gone
            do {
                try await sink.flushStage()
                print("round \(round): the move went through: a fork elsewhere held the reader")
                continue
            } catch {
                #expect(error.accepted == 0)
                #expect(sink.staged == 3000, "nothing left the stage")
                return
            }
        }
        Issue.record("a move into a pipe nobody reads succeeded, three times")
    }

    /// The supervisor gives each checkpointed stream its windows, at indexes after the fds it
    /// already attaches; other streams get none.
    @Test func windowsAreMadeForCheckpointedStreamsOnly() throws {
        var request = AdoptRequest(process: "p", streams: [
            StreamDescription(kind: .stdin, fd: 0, address: "unix:/x", mode: .resumable, checkpoint: 1),
            StreamDescription(kind: .stdout, fd: 1, address: "unix:/x", mode: .resumable, checkpoint: 2),
            StreamDescription(kind: .stderr, fd: 2, address: "unix:/x", mode: .raw),
        ])
        var descriptors: [Int32] = [100, 101, 102]
        try StreamWindows.add(to: &request, descriptors: &descriptors, outputCapacity: 1 << 20)
        defer { for fd in descriptors.dropFirst(3) { close(fd) } }
        #expect(descriptors.count == 7)
        #expect(request.streams[0].window == WindowPipe(read: 3, write: 4))
        #expect(request.streams[1].window == WindowPipe(read: 5, write: 6))
        #expect(request.streams[2].window == nil)
        let getPipeSize: Int32 = 1032  // F_GETPIPE_SZ (Glibc's module does not export it)
        #expect(fcntl(descriptors[5], getPipeSize) == 1 << 20, "an output's window holds what its pipe holds")
    }

    /// A window serves a checkpointed stream, and its ends are fds of their own.
    @Test func anAdoptNamingAWindowBadlyIsRefused() {
        let stdout = StreamDescription(
            kind: .stdout, fd: 0, address: "tcp://127.0.0.1:1", mode: .resumable, token: "out", secret: .random(), checkpoint: 3)
        func check(_ window: WindowPipe, checkpoint: Int? = 3, count: Int = 3) -> Bool {
            var stream = stdout
            stream.window = window
            stream.checkpoint = checkpoint
            return (try? AdoptCheck.validate(AdoptRequest(process: "p", streams: [stream]), descriptorCount: count)) != nil
        }
        #expect(check(WindowPipe(read: 1, write: 2)))
        #expect(!check(WindowPipe(read: 1, write: 2), checkpoint: nil), "no checkpoint: nothing to settle")
        #expect(!check(WindowPipe(read: 1, write: 3)), "an index out of range")
        #expect(!check(WindowPipe(read: 1, write: 1)), "one fd as both ends")
        #expect(!check(WindowPipe(read: 0, write: 2)), "the stream's own fd")
    }
}

/// A short read of a stream socket means it took everything queued, so the next wait skips the
/// EAGAIN probe — but a hang-up is reported once, and the wait after a short read must still
/// see the end-of-file that came with it.
@Suite("Short reads of a stream socket", .timeLimit(.minutes(2)))
struct ShortStreamReadTests {
    @Test func aShortReadWaitsForTheNextBytesAndAHangUpStillEnds() async throws {
        let (near, far) = try socketPair()
        defer { [near, far].forEach { $0.close() } }
        #expect(near.isStreamSocket)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)
        defer { buffer.deallocate() }
        // Bytes, a short read of them, and a wait that ends only when more arrive.
        try await send(far, bytes("first"))
        try await withTimeout("the first bytes") { try await near.waitReadable() }
        #expect(try near.readNow(into: buffer) == 5)
        let waiting = Task { try await near.waitReadable() }
        try await eventually("the wait to need an edge, not a probe") { near.readWaiters == 1 }
        try await send(far, bytes("second"))
        try await withTimeout("the wait to see the new bytes") { try await waiting.value }
        #expect(try near.readNow(into: buffer) == 6)
        // Bytes and the peer's close, both seen by the reactor before the read: the short read
        // takes the bytes, and the next wait must not wait for an edge the hang-up already was.
        try await send(far, bytes("last"))
        far.shutdownWrite()
        try await eventually("the hang-up seen") { near.registrationHasHungUp }
        #expect(try near.readNow(into: buffer) == 4)
        try await withTimeout("the end-of-file after the hang-up") { try await near.waitReadable() }
        #expect(try near.readNow(into: buffer) == 0)
    }
}
