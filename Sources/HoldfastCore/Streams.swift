/// What a relay writes process output into: the host end of a stdout, stderr or tty-output stream.
/// A raw stream is a `ConnSlot`; a resumable one adds offsets, acknowledgements and replay.
public protocol OutboundStream: Sendable {
    /// Sends every byte, parking while the host is away (which is what stops the relay reading
    /// its source: back-pressure). Throws `StreamClosed` if the stream is closed first.
    func send(_ bytes: UnsafeRawBufferPointer) async throws(StreamClosed)

    /// The source ended: delivers what is still pending, tells the host end-of-stream, and
    /// returns how many bytes could not be delivered (0 when everything arrived).
    func finish() async -> UInt64

    /// Moves one chunk from `source` into the stream (parking while the stream cannot take
    /// more). The default borrows a buffer from `pool` and calls `send`; a stream with its own
    /// storage reads straight into it.
    func pull(from source: some ByteReader, pool: BufferPool) async throws(StreamClosed) -> PullResult

    /// The stream's process exited: from now on a stream that cannot deliver gives up after its
    /// drain timeout instead of waiting for the host forever.
    func processExited()
}

public enum PullResult: Sendable, Equatable {
    case moved(Int)
    /// The source had nothing after all (a stale readiness report).
    case nothing
    case endOfFile
}

extension OutboundStream {
    public func pull(from source: some ByteReader, pool: BufferPool) async throws(StreamClosed) -> PullResult {
        let buffer = pool.take()
        defer { pool.recycle(buffer) }
        let count: Int
        do {
            guard let available = try source.readNow(into: buffer.bytes) else { return .nothing }
            count = available
        } catch {
            return .endOfFile  // a pty's EIO after its last slave closed is its end-of-file
        }
        guard count > 0 else { return .endOfFile }
        try await send(UnsafeRawBufferPointer(rebasing: buffer.bytes[..<count]))
        return .moved(count)
    }
}

/// What a relay reads process input from: the host end of a stdin or tty-input stream.
public protocol InboundStream: Sendable {
    /// Suspends until `receive` is likely to make progress, or the stream ended. Lets a relay
    /// hold no buffer while its stream is idle.
    func waitReceivable() async

    /// Receives at least one byte, parking while the host is away. Returns 0 only at the stream's
    /// explicit end (the host closed stdin, or the stream was closed), never because a
    /// connection died.
    func receive(into buffer: UnsafeMutableRawBufferPointer) async -> Int

    /// Moves up to `limit` received bytes straight into `sink` inside the kernel (splice(2)),
    /// parking while the host is away and waiting while nothing arrives. Returns the bytes moved,
    /// 0 at the stream's explicit end, or `nil` when the two cannot be spliced (the caller
    /// receives into a buffer instead). Throws when `sink` fails; bytes it did not take stay
    /// unreceived.
    func receive(into sink: some ByteWriter, limit: Int) async throws(WriteFailure) -> Int?

    /// The relay is about to write `count` received bytes to its sink (a process's pipe) — into
    /// its stage, holding `stageLevel` bytes, if the sink has one (`StagingWriter`)...
    func willDeliver(_ count: Int, stageLevel: Int?)
    /// ...and `count` of them went in: a stream that acknowledges only delivered bytes
    /// (`ResumableConfiguration.acknowledgeDelivered`) may now acknowledge them.
    func delivered(_ count: Int)
}

extension InboundStream {
    public func receive(into sink: some ByteWriter, limit: Int) async throws(WriteFailure) -> Int? { nil }
    public func willDeliver(_ count: Int, stageLevel: Int?) {}
    public func delivered(_ count: Int) {}
}

/// An outbound stream was closed before everything was sent.
public struct StreamClosed: Error, Sendable, Equatable {
    /// Bytes of the failed send that were not delivered.
    public var unsent: Int
    /// The stream was closed by its drain timeout (its process exited and the host stayed away),
    /// not by its owner.
    public var abandoned: Bool

    public init(unsent: Int, abandoned: Bool) {
        self.unsent = unsent
        self.abandoned = abandoned
    }
}

// MARK: - A ConnSlot is a raw stream.

extension ConnSlot: OutboundStream {
    public func send(_ bytes: UnsafeRawBufferPointer) async throws(StreamClosed) {
        do {
            try await write(bytes)
        } catch {
            throw StreamClosed(unsent: error.unsent, abandoned: error.abandoned)
        }
    }

    /// Raw mode has no acknowledgements: what was written went to a connection, so only a close
    /// remains (the host sees end-of-file). Bytes a dying connection had accepted are counted in
    /// `statistics.bytesUnconfirmed`, not here.
    public func finish() async -> UInt64 {
        close()
        return 0
    }

    /// Splices the source straight into the connection where both allow it (a pipe into a
    /// socket); otherwise copies through a buffer from `pool`. The loss accounting is the same
    /// either way: a connection that fails counts as unconfirmed what its last hand-over had
    /// still waiting for room (a copy's buffer, a splice's last pipe-full), and what it did not
    /// accept goes to the next connection — here by staying in the pipe.
    public func pull(from source: some ByteReader, pool: BufferPool) async throws(StreamClosed) -> PullResult {
        while true {
            guard let lease = await current() else {
                throw StreamClosed(unsent: 0, abandoned: phase == .abandoned)
            }
            let result: SpliceResult?
            do {
                result = try await lease.connection.splice(from: source, limit: spliceLimit)
            } catch {
                recordFailedWrite(error)
                disconnect(ifCurrent: lease.generation, reason: .writeFailed)
                if error.accepted > 0 { return .moved(error.accepted) }
                continue  // the bytes are still in the source: on to the next connection
            }
            guard let result else { return try await copy(from: source, pool: pool) }
            switch result {
            case .moved(let count):
                recordWrite(count)
                return .moved(count)
            case .sourceEmpty: return .nothing
            case .endOfFile, .sourceFailed: return .endOfFile
            }
        }
    }

    /// The copying pull: what `OutboundStream.pull` does by default.
    private func copy(from source: some ByteReader, pool: BufferPool) async throws(StreamClosed) -> PullResult {
        let buffer = pool.take()
        defer { pool.recycle(buffer) }
        let count: Int
        do {
            guard let available = try source.readNow(into: buffer.bytes) else { return .nothing }
            count = available
        } catch {
            return .endOfFile  // a pty's EIO after its last slave closed is its end-of-file
        }
        guard count > 0 else { return .endOfFile }
        try await send(UnsafeRawBufferPointer(rebasing: buffer.bytes[..<count]))
        return .moved(count)
    }

    /// The raw stream's drain: once empty for the drain timeout, the slot is abandoned.
    public func processExited() {
        setDrainTimeout(rawDrainTimeout)
    }
}

/// The most one splice pass moves (no buffer is involved: only how long one pass may run).
let spliceLimit = 1 << 20

/// The drain timeout `processExited()` applies to raw slots (set per slot with
/// `setDrainTimeout` for anything else).
public let rawDrainTimeout: Duration = .seconds(30)

extension ConnSlot: InboundStream {
    public func waitReceivable() async {
        while let lease = await current() {
            do {
                try await lease.connection.waitReadable()
                return
            } catch {
                disconnect(ifCurrent: lease.generation, reason: .readFailed)
            }
        }
    }

    public func receive(into buffer: UnsafeMutableRawBufferPointer) async -> Int {
        await read(into: buffer)
    }

    /// Splices from the current connection into `sink` (a socket into a pipe). A connection's
    /// end or failure only drops it; the next one continues. Returns 0 once the slot is closed
    /// or the task cancelled.
    public func receive(into sink: some ByteWriter, limit: Int) async throws(WriteFailure) -> Int? {
        while true {
            guard let lease = await current() else { return 0 }
            guard let result = try await sink.splice(from: lease.connection, limit: max(limit, spliceLimit)) else { return nil }
            switch result {
            case .moved(let count):
                recordRead(count)
                return count
            case .sourceEmpty:
                do {
                    try await lease.connection.waitReadable()
                } catch {
                    if Task.isCancelled { return 0 }
                    disconnect(ifCurrent: lease.generation, reason: .readFailed)
                }
            case .endOfFile:
                disconnect(ifCurrent: lease.generation, reason: .endOfFile)
            case .sourceFailed:
                disconnect(ifCurrent: lease.generation, reason: .readFailed)
            }
        }
    }
}

// MARK: - Async sequence view

extension InboundStream {
    /// The stream as an async sequence of byte chunks (at most `maximumChunk` bytes each) that
    /// ends at the stream's explicit end. Pull-driven: nothing is read ahead of the consumer, so
    /// a slow consumer slows the sender instead of growing a buffer.
    public func chunks(maximumChunk: Int = 64 * 1024) -> InboundChunks<Self> {
        InboundChunks(stream: self, maximumChunk: maximumChunk)
    }
}

public struct InboundChunks<Stream: InboundStream>: AsyncSequence, Sendable {
    public typealias Element = [UInt8]
    let stream: Stream
    let maximumChunk: Int

    public struct AsyncIterator: AsyncIteratorProtocol {
        let stream: Stream
        let maximumChunk: Int
        var ended = false

        public mutating func next() async -> [UInt8]? {
            guard !ended else { return nil }
            await stream.waitReceivable()
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: maximumChunk, alignment: 16)
            defer { buffer.deallocate() }
            let count = await stream.receive(into: buffer)
            guard count > 0 else {
                ended = true
                return nil
            }
            return Array(buffer[..<count])
        }
    }

    public func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(stream: stream, maximumChunk: maximumChunk)
    }
}

extension OutboundStream {
    /// `send` for bytes in an array (host agents writing a process's stdin).
    public func send(_ bytes: [UInt8]) async throws(StreamClosed) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 1)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: bytes)
        try await send(UnsafeRawBufferPointer(rebasing: buffer[..<bytes.count]))
    }
}
