import CHoldfastShims
import HoldfastCore
import HoldfastProtocol
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The windows of checkpointed streams (docs/ARCHITECTURE.md, "Surviving a broker crash"): one
/// pipe per stream direction that the supervisor holds, between the process's fd and the
/// broker. An output's bytes are spliced from the process's pipe into its window (inside the
/// kernel: a crash leaves each byte in one pipe or the other, never in neither) and read from
/// there into the ring; an input's are written into its window (its stage) and spliced on into
/// the process's pipe. The relay records the window's level before each read or write that a
/// crash could interrupt, so the next broker learns from the level it finds exactly how many
/// bytes that syscall moved.
public enum StreamWindows {
    /// Makes a window for every checkpointed stream of `request` that has none, appending both
    /// ends to `descriptors` and naming them in the request. `outputCapacity` sizes a pipe
    /// output's window (a splice moves at most a window-full). On failure nothing made here is
    /// left open and `request` and `descriptors` are unchanged.
    public static func add(to request: inout AdoptRequest, descriptors: inout [Int32], outputCapacity: Int? = nil) throws(SystemError) {
        var streams = request.streams
        var made: [Int32] = []
        func window(capacity: Int?) throws(SystemError) -> WindowPipe {
            let pipe = try PipeEnds.make(capacity: capacity)
            made += [pipe.read, pipe.write]
            let first = descriptors.count + made.count - 2
            return WindowPipe(read: first, write: first + 1)
        }
        do throws(SystemError) {
            for index in streams.indices {
                let stream = streams[index]
                if stream.checkpoint != nil, stream.window == nil {
                    let isPipeOutput = stream.kind == .stdout || stream.kind == .stderr
                    streams[index].window = try window(capacity: isPipeOutput ? outputCapacity : nil)
                }
                if stream.inputCheckpoint != nil, stream.inputWindow == nil {
                    streams[index].inputWindow = try window(capacity: nil)
                }
            }
        } catch {
            for fd in made { _ = Glibc.close(fd) }
            throw error
        }
        request.streams = streams
        descriptors += made
    }
}

/// A window's two ends, as the broker holds them.
public struct WindowEnds: Sendable {
    public let read: AsyncFD
    public let write: AsyncFD

    public init(read: AsyncFD, write: AsyncFD) {
        self.read = read
        self.write = write
    }

    /// The bytes in the window now (FIONREAD).
    public func level() throws(SystemError) -> Int {
        var count: Int32 = 0
        let result: Int32
        do {
            result = try read.withSyscall { hf_ioctl_fionread(read.fd, &count) }
        } catch {
            throw SystemError("ioctl(FIONREAD, window)", errno: .badFileDescriptor)
        }
        guard result == 0 else { throw .last("ioctl(FIONREAD, window fd \(read.fd))") }
        return Int(count)
    }

    public func close() {
        read.close()
        write.close()
    }
}

/// A process's output read through its window: `fillWindow` splices what the process wrote
/// into the window (only when the window is empty, at most what the relay can take), and
/// `readNow` reads the window. A window that held bytes when this broker started (its
/// predecessor died between the two) is read first.
public final class WindowedSource: ByteReader {
    public let source: AsyncFD
    public let window: WindowEnds
    /// Bytes in the window: set by each splice, lowered by each read.
    private let level: Atomic<Int>
    /// This kernel cannot splice from the source (a pty before Linux 6.5): it is read directly,
    /// as a source without a window is.
    private let direct = Atomic<Bool>(false)

    /// `level`: what the window holds now (`WindowEnds.level()`, read once at the start).
    public init(source: AsyncFD, window: WindowEnds, level: Int) {
        self.source = source
        self.window = window
        self.level = Atomic(level)
    }

    public var largestRead: Int? { source.largestRead }

    public func waitReadable() async throws {
        if level.load(ordering: .relaxed) > 0 {
            // The window's last read was refused for want of memory: its bytes wait there,
            // and a read tried again at once would only be refused again.
            if window.read.lastReadFoundShortage { try await window.read.waitReadable() }
            return
        }
        try await source.waitReadable()
    }

    public func fillWindow(upTo limit: Int) throws -> WindowFill {
        if direct.load(ordering: .relaxed) { return .unwindowed }
        let held = level.load(ordering: .relaxed)
        if held > 0 { return .holding(held) }
        let seen = source.registrationEdges(.read)
        let outcome = try window.write.spliceOnce(from: source, limit: limit)
        if outcome.count > 0 {
            level.store(outcome.count, ordering: .relaxed)
            source.noteRead(outcome.count, seen: seen)
            return .holding(outcome.count)
        }
        if outcome.count == 0 { return .endOfFile }
        switch outcome.errno {
        case EAGAIN:
            source.noteRead(nil, seen: seen)
            return .nothing
        case let number where AsyncFD.isShortage(number):
            // No memory for the move (a terminal's bytes copied into a page): tried again.
            source.waitOutShortage(.read)
            source.noteRead(nil, seen: seen, short: true)
            return .nothing
        case EINVAL:
            direct.store(true, ordering: .relaxed)
            return .unwindowed
        default:
            // A pty's EIO once its last slave closed: the caller's end-of-file.
            throw SystemError("splice(fd \(source.fd) into its window)", errno: Errno(rawValue: outcome.errno))
        }
    }

    public func readNow(into buffers: [UnsafeMutableRawBufferPointer]) throws -> Int? {
        if level.load(ordering: .relaxed) == 0 {
            switch try fillWindow(upTo: buffers.reduce(0) { $0 + $1.count }) {
            case .unwindowed: return try source.readNow(into: buffers)
            case .nothing: return nil
            case .endOfFile: return 0
            case .holding: break
            }
        }
        guard let count = try window.read.readNow(into: buffers), count > 0 else {
            // Refused for want of memory: the bytes are still in the window (its level is what
            // a successor settles a crash by, so it must stay true).
            if window.read.lastReadFoundShortage { return nil }
            // The window is the supervisor's and ours alone: empty means our count was wrong.
            level.store(0, ordering: .relaxed)
            return nil
        }
        level.subtract(count, ordering: .relaxed)
        return count
    }

    public func readNow(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? {
        try readNow(into: [buffer])
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) async throws -> Int {
        while true {
            try await waitReadable()
            if let count = try readNow(into: buffer) { return count }
        }
    }
}

/// A process's input written through its window (its stage): `stage` writes into the window,
/// `flushStage` splices what it holds on into the process's pipe, waiting while that is full.
/// A stage that held bytes when this broker started (its predecessor died between the two) is
/// flushed first: those bytes were already counted as delivered.
public final class StagingSink: StagingWriter {
    public let sink: AsyncFD
    public let stage: WindowEnds
    private let level: Atomic<Int>
    /// This kernel cannot splice into the sink: the stage is emptied through a buffer.
    private let direct = Atomic<Bool>(false)

    public init(sink: AsyncFD, stage: WindowEnds, level: Int) {
        self.sink = sink
        self.stage = stage
        self.level = Atomic(level)
    }

    public var staged: Int { level.load(ordering: .relaxed) }

    /// The stage's write-edge count when an empty stage refused bytes (`stage`), or `.max`.
    private let refusedAt = Atomic<UInt64>(.max)

    /// After an empty stage refused bytes for want of memory: waits until the stage's writers
    /// are woken (the shortage's retry), so the caller's next `stage` is not refused at once.
    private func waitOutRefusal() async throws(WriteFailure) {
        let seen = refusedAt.exchange(.max, ordering: .relaxed)
        guard seen != .max else { return }
        do {
            try await stage.write.waitForWriteEdge(after: seen)
        } catch {
            throw WriteFailure(accepted: 0, cause: error)
        }
    }

    public func stage(_ bytes: UnsafeRawBufferPointer) throws(WriteFailure) -> Int {
        let seen = stage.write.registrationEdges(.write)
        let count: Int?
        do {
            count = try stage.write.writeNow(bytes)
        } catch {
            throw WriteFailure(accepted: 0, cause: error)
        }
        guard let count, count > 0 else {
            if staged > 0 { return 0 }
            // An empty stage has room: only a kernel short of memory refuses it
            // (`AsyncFD.isShortage`, which wakes the stage's writers later). `flushStage`
            // waits for that.
            refusedAt.store(seen, ordering: .relaxed)
            return 0
        }
        level.add(count, ordering: .relaxed)
        return count
    }

    public func flushStage() async throws(WriteFailure) {
        var moved = 0
        while true {
            let held = staged
            guard held > 0 else {
                try await waitOutRefusal()
                return
            }
            if direct.load(ordering: .relaxed) {
                moved += try await bounce(held, movedBefore: moved)
                continue
            }
            let seen = sink.registrationEdges(.write)
            let outcome: (count: Int, errno: Int32)
            do {
                outcome = try sink.spliceOnce(from: stage.read, limit: held)
            } catch {
                throw WriteFailure(accepted: moved, cause: error)
            }
            if outcome.count > 0 {
                level.subtract(outcome.count, ordering: .relaxed)
                moved += outcome.count
                continue
            }
            switch outcome.errno {
            case EAGAIN:
                do {
                    try await sink.waitForWriteEdge(after: seen)
                } catch {
                    throw WriteFailure(accepted: moved, cause: error)
                }
            case let number where AsyncFD.isShortage(number):
                sink.waitOutShortage(.write)
                do {
                    try await sink.waitForWriteEdge(after: seen)
                } catch {
                    throw WriteFailure(accepted: moved, cause: error)
                }
            case EINVAL:
                direct.store(true, ordering: .relaxed)
            default:
                throw WriteFailure(accepted: moved, cause: SystemError("splice(stage into fd \(sink.fd))", errno: Errno(rawValue: outcome.errno)))
            }
        }
    }

    /// Moves up to 64 KiB of the stage through a buffer (a sink this kernel cannot splice into).
    private func bounce(_ held: Int, movedBefore: Int) async throws(WriteFailure) -> Int {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: min(held, 64 * 1024), alignment: 16)
        defer { buffer.deallocate() }
        let count: Int
        do {
            guard let read = try stage.read.readNow(into: buffer) else {
                // Refused for want of memory: the bytes are still in the stage, and its level
                // (what a successor settles a crash by) stays true. Tried again once woken.
                if stage.read.lastReadFoundShortage {
                    try await stage.read.waitReadable()
                    return 0
                }
                level.store(0, ordering: .relaxed)  // our count was wrong: nothing is there
                return 0
            }
            count = read
        } catch {
            throw WriteFailure(accepted: movedBefore, cause: error)
        }
        guard count > 0 else {
            level.store(0, ordering: .relaxed)  // our count was wrong: nothing is there
            return 0
        }
        // Out of the stage, not yet in the sink: these must go in before anything else.
        level.subtract(count, ordering: .relaxed)
        do {
            try await sink.write(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
        } catch {
            throw WriteFailure(accepted: movedBefore + error.accepted, cause: error.cause)
        }
        return count
    }

    public func write(_ bytes: UnsafeRawBufferPointer) async throws(WriteFailure) {
        var done = 0
        while done < bytes.count {
            let count = try stage(UnsafeRawBufferPointer(rebasing: bytes[done...]))
            do {
                try await flushStage()
            } catch {
                throw WriteFailure(accepted: done + count, cause: error.cause)
            }
            done += count
        }
    }
}
