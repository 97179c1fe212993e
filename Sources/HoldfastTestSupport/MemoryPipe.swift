import HoldfastCore
import HoldfastProtocol
import NIOConcurrencyHelpers

/// An in-memory, bidirectional connection pair with fault injection, for testing the
/// resumable protocol at thousands of reconnects per second.
///
/// Faults:
/// - `cut()`: both ends die at once and every byte in flight either way is lost (a migration,
///   a killed host agent); pending reads and writes fail.
/// - a byte *budget*: after that many bytes written (either way) the link is cut in the middle
///   of the write that crosses it — the writer sees a short write, and whatever frame it was
///   (hello, data, ack, end) arrives truncated: each end still reads what was written to it
///   before the cut, then fails; nothing more is written either way. (Cutting at once, as
///   `cut()` does, would lose the crossing write whole: with more bytes to replay than any
///   budget, no link would ever carry one, and a pair would redial forever.)
/// - `holdDelivery`: bytes written are held back until `release` (delayed acks and hellos).
/// - `dropFrames`: frames of one type toward one side vanish (a third-party peer that never
///   sends them), every other byte arrives.
public final class MemoryPipe: Sendable {
    public final class End: ByteConnection, CustomStringConvertible {
        let pipe: MemoryPipe
        let side: Int
        fileprivate init(pipe: MemoryPipe, side: Int) {
            self.pipe = pipe
            self.side = side
        }

        public var description: String { "memory pipe end \(side)" }

        public func waitReadable() async throws { try await pipe.waitReadable(side) }
        public func read(into buffer: UnsafeMutableRawBufferPointer) async throws -> Int {
            while true {
                if let count = try readNow(into: buffer) { return count }
                try await pipe.waitReadable(side)
            }
        }
        public func readNow(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? { try pipe.readNow(side, into: buffer) }
        public func write(_ bytes: UnsafeRawBufferPointer) async throws(WriteFailure) { try pipe.write(side, bytes) }
        /// Like a socket's close: the peer still reads what was sent, then end-of-file.
        public func close() { pipe.close(side) }
    }

    public struct LinkCut: Error, Sendable, Equatable {}

    private struct State {
        /// Bytes in flight toward side 0 and side 1.
        var queues: [[UInt8]] = [[], []]
        var heads: [Int] = [0, 0]
        var cut = false
        var closed: [Bool] = [false, false]
        var budget: Int?
        /// The budget ran out: writes fail either way; reads take what is queued, then fail.
        var exhausted = false
        var held = false
        /// Bytes toward this side are held (one-way `holdDelivery(toSide:)`).
        var heldToward: [Bool] = [false, false]
        var readers: [Int: (side: Int, continuation: CheckedContinuation<Void, any Error>)] = [:]
        var nextReader = 0
        var transferred = 0
        /// Frames of this type toward side 0 and side 1 are dropped (nil: none are).
        var dropped: [StreamFrameType?] = [nil, nil]
        var framing: [FrameCursor] = [FrameCursor(), FrameCursor()]
    }

    /// Where a direction's byte stream stands in its frames: the prefix being read, then how
    /// much of the current frame's body is left and whether the frame is dropped.
    private struct FrameCursor {
        var prefix: [UInt8] = []
        var bodyLeft = 0
        var dropping = false
        var droppedFrames = 0

        /// The bytes of `bytes` to deliver, dropping every whole frame of `type`.
        mutating func filter(_ bytes: UnsafeRawBufferPointer, dropping type: StreamFrameType) -> [UInt8] {
            var kept: [UInt8] = []
            var index = 0
            while index < bytes.count {
                if bodyLeft > 0 {
                    let count = min(bodyLeft, bytes.count - index)
                    if !dropping { kept += bytes[index..<index + count] }
                    bodyLeft -= count
                    index += count
                    continue
                }
                let count = min(StreamFramePrefix.size - prefix.count, bytes.count - index)
                prefix += bytes[index..<index + count]
                index += count
                guard prefix.count == StreamFramePrefix.size else { continue }
                // A prefix that does not decode goes through as it is: the reader's error.
                let decoded = prefix.withUnsafeBytes { try? StreamFramePrefix.decode($0) }
                dropping = decoded?.type == type
                if dropping { droppedFrames += 1 }
                bodyLeft = decoded?.bodyLength ?? 0
                if !dropping { kept += prefix }
                prefix.removeAll(keepingCapacity: true)
            }
            return kept
        }
    }

    private let state: NIOLockedValueBox<State>

    /// - Parameter budget: bytes the link carries before it is cut mid-write; nil = unlimited.
    public init(budget: Int? = nil) {
        var initial = State()
        initial.budget = budget
        state = NIOLockedValueBox(initial)
    }

    /// The two ends: whoever dials takes one, whoever accepts the other.
    public var ends: (End, End) { (End(pipe: self, side: 0), End(pipe: self, side: 1)) }

    public var isCut: Bool { state.withLockedValue { $0.cut || $0.exhausted } }
    public var bytesTransferred: Int { state.withLockedValue { $0.transferred } }

    public func holdDelivery() { state.withLockedValue { $0.held = true } }

    /// Holds only what travels toward `side` (0: whoever dialed, 1: whoever accepted): that
    /// end stops hearing its peer while the other still does.
    public func holdDelivery(toSide side: Int) { state.withLockedValue { $0.heldToward[side] = true } }

    /// Drops every frame of `type` written toward `side` (0: whoever dialed, 1: whoever
    /// accepted) from now on: set it before the first frame, or the cursor starts mid-frame.
    public func dropFrames(_ type: StreamFrameType, towardSide side: Int) {
        state.withLockedValue { $0.dropped[side] = type }
    }

    /// Frames `dropFrames` has dropped, both ways.
    public var droppedFrames: Int { state.withLockedValue { $0.framing[0].droppedFrames + $0.framing[1].droppedFrames } }

    public func releaseDelivery() {
        let readers = state.withLockedValue { s -> [CheckedContinuation<Void, any Error>] in
            s.held = false
            s.heldToward = [false, false]
            defer { s.readers.removeAll() }
            return s.readers.values.map(\.continuation)
        }
        for reader in readers { reader.resume() }
    }

    fileprivate func close(_ side: Int) {
        let readers = state.withLockedValue { s -> [CheckedContinuation<Void, any Error>] in
            s.closed[side] = true
            defer { s.readers.removeAll() }
            return s.readers.values.map(\.continuation)
        }
        for reader in readers { reader.resume() }
    }

    /// Kills the link: both ends fail, in-flight bytes are lost.
    public func cut() {
        let readers = state.withLockedValue { s -> [CheckedContinuation<Void, any Error>] in
            s.cut = true
            s.queues = [[], []]
            s.heads = [0, 0]
            defer { s.readers.removeAll() }
            return s.readers.values.map(\.continuation)
        }
        for reader in readers { reader.resume(throwing: LinkCut()) }
    }

    fileprivate func write(_ side: Int, _ bytes: UnsafeRawBufferPointer) throws(WriteFailure) {
        let other = 1 - side
        let (accepted, wake, cutNow) = state.withLockedValue { s -> (Int, [CheckedContinuation<Void, any Error>], Bool) in
            if s.cut || s.exhausted || s.closed[side] || s.closed[other] { return (-1, [], false) }
            var accepted = bytes.count
            var cutNow = false
            if let budget = s.budget, budget < bytes.count {
                accepted = budget
                cutNow = true
                s.exhausted = true
            }
            s.budget = s.budget.map { $0 - accepted }
            if let type = s.dropped[other] {
                s.queues[other] += s.framing[other].filter(UnsafeRawBufferPointer(rebasing: bytes[..<accepted]), dropping: type)
            } else {
                s.queues[other] += bytes[..<accepted]
            }
            s.transferred += accepted
            if cutNow {
                // Every reader, either side, learns of the cut once it has read what is queued.
                defer { s.readers.removeAll() }
                return (accepted, s.readers.values.map(\.continuation), cutNow)
            }
            guard !s.held, !s.heldToward[other] else { return (accepted, [], cutNow) }
            var wake: [CheckedContinuation<Void, any Error>] = []
            for (key, reader) in s.readers where reader.side == other {
                wake.append(reader.continuation)
                s.readers.removeValue(forKey: key)
            }
            return (accepted, wake, cutNow)
        }
        for reader in wake { reader.resume() }
        if accepted < 0 { throw WriteFailure(accepted: 0, cause: LinkCut()) }
        if cutNow { throw WriteFailure(accepted: accepted, cause: LinkCut()) }
    }

    fileprivate func readNow(_ side: Int, into buffer: UnsafeMutableRawBufferPointer) throws -> Int? {
        try state.withLockedValue { s -> Int? in
            if s.cut || s.closed[side] { throw LinkCut() }
            if s.held || s.heldToward[side] { return nil }
            let available = s.queues[side].count - s.heads[side]
            guard available > 0 else {
                if s.exhausted { throw LinkCut() }
                return s.closed[1 - side] ? 0 : nil
            }
            let count = min(available, buffer.count)
            let head = s.heads[side]
            s.queues[side].withUnsafeBytes { raw in
                buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[head..<head + count]))
            }
            s.heads[side] += count
            if s.heads[side] == s.queues[side].count {
                s.queues[side].removeAll(keepingCapacity: true)
                s.heads[side] = 0
            }
            return count
        }
    }

    fileprivate func waitReadable(_ side: Int) async throws {
        let id = state.withLockedValue { s -> Int in
            s.nextReader += 1
            return s.nextReader
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let outcome: Result<Void, any Error>? = state.withLockedValue { s in
                    if s.cut || s.closed[side] { return .failure(LinkCut()) }
                    if !s.held, !s.heldToward[side], s.queues[side].count > s.heads[side] || s.closed[1 - side] { return .success(()) }
                    if s.exhausted, s.queues[side].count == s.heads[side] { return .failure(LinkCut()) }
                    if Task.isCancelled { return .failure(CancellationError()) }
                    s.readers[id] = (side, continuation)
                    return nil
                }
                if let outcome { continuation.resume(with: outcome) }
            }
        } onCancel: {
            state.withLockedValue { $0.readers.removeValue(forKey: id) }?.continuation.resume(throwing: CancellationError())
        }
    }
}
