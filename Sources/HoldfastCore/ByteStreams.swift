/// The byte-moving vocabulary of Holdfast's core.
///
/// The core never makes a syscall: pipes, ptys and sockets are adapted to these protocols in
/// `HoldfastPosix`, and tests adapt in-memory fakes. Buffers are raw pointers because the data
/// plane moves hundreds of MiB/s and must not copy or zero-fill on the way.

/// A source of bytes: a pipe's read end, a pty master, a connection.
public protocol ByteReader: Sendable {
    /// Suspends until a read is likely to make progress (bytes, end-of-file or an error pending).
    /// A relay calls this before it borrows a buffer, so an idle stream holds no buffer.
    func waitReadable() async throws

    /// Reads at least one byte, suspending while none is available. Returns 0 at end-of-file.
    func read(into buffer: UnsafeMutableRawBufferPointer) async throws -> Int

    /// Reads what is available now without suspending: `nil` when nothing is, 0 at end-of-file.
    func readNow(into buffer: UnsafeMutableRawBufferPointer) throws -> Int?

    /// `readNow` into several buffers, filling them in order (an fd does it with one readv).
    func readNow(into buffers: [UnsafeMutableRawBufferPointer]) throws -> Int?

    /// The most a relay should ask one read for, if the source says (a terminal's master:
    /// 4 KiB, what its line discipline holds, so its reads are small anyway), else nil. A read a
    /// crash interrupts is reported as a gap of what was asked: this keeps that gap small.
    var largestRead: Int? { get }

    /// A source with a *window* (a pipe a process that outlives the relay holds, between the
    /// process's pipe and the relay) moves up to `limit` bytes into it inside the kernel — if it
    /// is empty — and says how many it holds; the relay then records that level before it reads
    /// the window (`readNow`), so a crash inside that read is measured afterwards, not guessed
    /// (docs/ARCHITECTURE.md, "Surviving a broker crash"). Any other source: `.unwindowed`.
    func fillWindow(upTo limit: Int) throws -> WindowFill
}

/// What `ByteReader.fillWindow` found.
public enum WindowFill: Sendable, Equatable {
    /// The source has no window: read it directly.
    case unwindowed
    /// The window holds this many bytes (at least one): the next read takes them.
    case holding(Int)
    /// Nothing in the window, nothing in the source now.
    case nothing
    /// Nothing in the window, and the source reached end-of-file.
    case endOfFile
}

extension ByteReader {
    public var largestRead: Int? { nil }
    public func fillWindow(upTo limit: Int) throws -> WindowFill { .unwindowed }

    public func readNow(into buffers: [UnsafeMutableRawBufferPointer]) throws -> Int? {
        var total = 0
        for buffer in buffers {
            guard let count = try readNow(into: buffer) else { return total > 0 ? total : nil }
            total += count
            if count < buffer.count { break }
        }
        return total
    }
}

/// A sink of bytes: a pipe's write end, a pty master, a connection.
public protocol ByteWriter: Sendable {
    /// Writes every byte, or throws how many bytes the sink accepted before it failed.
    func write(_ bytes: UnsafeRawBufferPointer) async throws(WriteFailure)

    /// Writes `header` then `body` as one stream (a socket does it in one writev). A failure
    /// counts accepted bytes across both.
    func write(_ header: UnsafeRawBufferPointer, _ body: UnsafeRawBufferPointer) async throws(WriteFailure)

    /// Writes every byte of `vectors`, in order, as one stream (a socket does it with one
    /// sendmsg per attempt). A failure counts accepted bytes across all of them.
    func write(vectors: [UnsafeRawBufferPointer]) async throws(WriteFailure)

    /// Moves up to `limit` bytes from `source` into this writer inside the kernel (splice(2):
    /// the bytes never enter this process), suspending while this writer is full. Returns `nil`
    /// when the two ends cannot be spliced (not both fds, neither a pipe, a terminal): the caller
    /// copies instead. Throws, with the bytes moved before, when this writer fails; a failing
    /// source is reported as `.sourceFailed`. Bytes not moved stay in the source.
    func splice(from source: some ByteReader, limit: Int) async throws(WriteFailure) -> SpliceResult?
}

/// A sink that puts bytes first in a *stage* (a pipe a process that outlives the relay holds)
/// and moves them on into the process's pipe from there: a write into the stage that a crash
/// interrupts is measured afterwards from the stage's level, and what the stage holds reaches
/// the process whoever moves it on — so every byte is delivered exactly once.
public protocol StagingWriter: ByteWriter {
    /// Bytes in the stage, not yet moved on.
    var staged: Int { get }
    /// Puts up to `bytes.count` bytes in the stage without waiting: how many went in (0 when
    /// the stage is full, or the kernel refused an empty one memory: `flushStage` waits that out).
    func stage(_ bytes: UnsafeRawBufferPointer) throws(WriteFailure) -> Int
    /// Moves everything staged into the sink, waiting while it is full. A failure counts the
    /// bytes that did move.
    func flushStage() async throws(WriteFailure)
}

/// What one `ByteWriter.splice(from:limit:)` did.
public enum SpliceResult: Sendable {
    /// This many bytes (at least one) moved; the source may hold more.
    case moved(Int)
    /// The source has nothing now: wait until it is readable.
    case sourceEmpty
    /// The source reached end-of-file.
    case endOfFile
    /// Reading the source failed (a connection reset).
    case sourceFailed(any Error)
}

extension ByteWriter {
    public func splice(from source: some ByteReader, limit: Int) async throws(WriteFailure) -> SpliceResult? { nil }
}

extension ByteWriter {
    public func write(vectors: [UnsafeRawBufferPointer]) async throws(WriteFailure) {
        var accepted = 0
        for vector in vectors {
            do {
                try await write(vector)
            } catch {
                throw WriteFailure(accepted: accepted + error.accepted, cause: error.cause)
            }
            accepted += vector.count
        }
    }

    public func write(_ header: UnsafeRawBufferPointer, _ body: UnsafeRawBufferPointer) async throws(WriteFailure) {
        try await write(header)
        do {
            try await write(body)
        } catch {
            throw WriteFailure(accepted: header.count + error.accepted, cause: error.cause)
        }
    }
}

/// A bidirectional transport to the host for one stream (a Unix, TCP or vsock socket).
/// Conformers are classes because a ConnSlot compares connections by identity.
public protocol ByteConnection: ByteReader, ByteWriter, AnyObject {
    /// Closes the transport; wakes any read or write suspended on it with an error. Idempotent.
    func close()

    /// Ends our direction only: the peer reads what was sent, then end-of-file.
    func shutdownWrite()
}

extension ByteConnection {
    public func shutdownWrite() {}
}

/// A write that failed part-way. `accepted` bytes were taken by the sink (for a socket: copied
/// into the kernel's send buffer) before `cause` happened; the rest were not.
public struct WriteFailure: Error, Sendable, CustomStringConvertible {
    public var accepted: Int
    /// Of `accepted`, the bytes of the last hand-over before the failure: what a raw stream
    /// counts as unconfirmed. All of `accepted` for a write of one buffer. A splice pass moves
    /// one pipe-full after another, and the peer reads the earlier ones while the later ones
    /// go in: counting all of them would report bytes that arrived as lost.
    public var unconfirmed: Int
    public var cause: any Error

    public init(accepted: Int, unconfirmed: Int? = nil, cause: any Error) {
        self.accepted = accepted
        self.unconfirmed = min(unconfirmed ?? accepted, accepted)
        self.cause = cause
    }

    public var description: String { "write failed after \(accepted) bytes: \(cause)" }
}
