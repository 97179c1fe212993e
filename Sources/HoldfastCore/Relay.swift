/// How a relay ended, and what it moved.
public struct RelayReport: Sendable, Equatable, CustomStringConvertible {
    public enum Ending: String, Sendable {
        /// The source reached end-of-file (output) or the host ended the stream (input).
        case endOfStream
        /// The stream was closed by its owner (release, shutdown).
        case streamClosed
        /// The process exited and the host stayed away past the drain timeout.
        case abandoned
        /// The process no longer reads its input (EPIPE), or its output failed.
        case processGone
        /// The relay task was cancelled.
        case cancelled
    }

    public var ending: Ending
    /// Bytes moved from source to destination.
    public var bytes: UInt64
    /// Bytes that were produced but could not be delivered.
    public var undelivered: UInt64

    public init(ending: Ending, bytes: UInt64, undelivered: UInt64) {
        self.ending = ending
        self.bytes = bytes
        self.undelivered = undelivered
    }

    public var description: String { "\(ending.rawValue): \(bytes) bytes relayed, \(undelivered) undelivered" }
}

/// The relays: the loops that move bytes between a process's stdio and its host streams.
public enum Relay {
    /// Process output (a pipe's read end or a pty master) → host. Reads only when it can write
    /// on: while the stream is parked the relay is parked too, so the pipe fills and the process
    /// blocks in write(2) — back-pressure, never loss and never SIGPIPE.
    public static func output(
        from source: some ByteReader,
        to stream: some OutboundStream,
        pool: BufferPool = .shared
    ) async -> RelayReport {
        var relayed: UInt64 = 0
        var sinceYield = 0
        while true {
            if sinceYield >= yieldEvery {
                sinceYield = 0
                await Task.yield()
            }
            do {
                try await source.waitReadable()
            } catch {
                // Cancelled (a release, a live upgrade's quiesce, a stop): the source has not
                // ended — the stream is closed by its owner, never finished. A finish here sent
                // END for a process still writing, racing the owner's close of the connection:
                // the host took the output for ended, and refused the next relay's resume.
                if Task.isCancelled { return RelayReport(ending: .cancelled, bytes: relayed, undelivered: 0) }
                return await finish(stream, relayed: relayed)
            }
            do {
                switch try await stream.pull(from: source, pool: pool) {
                case .moved(let count):
                    relayed &+= UInt64(count)
                    sinceYield += max(count, smallestCharge)
                case .nothing: continue
                case .endOfFile: return await finish(stream, relayed: relayed)
                }
            } catch {
                if Task.isCancelled {
                    return RelayReport(ending: .cancelled, bytes: relayed - min(relayed, UInt64(error.unsent)), undelivered: UInt64(error.unsent))
                }
                // The stream is gone for good. What the process still wrote is lost: count it,
                // so the loss is reported and not hidden.
                let left = error.abandoned ? countRemaining(source, pool: pool) : 0
                let unsent = UInt64(error.unsent)
                return RelayReport(
                    ending: error.abandoned ? .abandoned : .streamClosed,
                    bytes: relayed - min(relayed, unsent), undelivered: unsent + left)
            }
        }
    }

    /// Host → process input (a pipe's write end or a pty master). Ends when the host ends the
    /// stream explicitly (the caller then closes the pipe: the process sees end-of-file) or when
    /// the process stops reading (EPIPE).
    public static func input(
        from stream: some InboundStream,
        to sink: some ByteWriter,
        pool: BufferPool = .shared
    ) async -> RelayReport {
        var relayed: UInt64 = 0
        var sinceYield = 0
        // Straight from the connection into the pipe while the two can be spliced: no buffer.
        while true {
            let moved: Int?
            do {
                moved = try await stream.receive(into: sink, limit: pool.bufferSize)
            } catch {
                return RelayReport(ending: .processGone, bytes: relayed + UInt64(error.accepted), undelivered: 0)
            }
            guard let moved else { break }
            if moved == 0 {
                let ending: RelayReport.Ending = Task.isCancelled ? .cancelled : .endOfStream
                return RelayReport(ending: ending, bytes: relayed, undelivered: 0)
            }
            relayed &+= UInt64(moved)
            sinceYield += moved
            if sinceYield >= yieldEvery {
                sinceYield = 0
                await Task.yield()
            }
        }
        // A sink with a stage (stdin under a checkpoint): what a crashed predecessor staged goes
        // in first — it comes before anything the stream resumes with.
        let staging = sink as? any StagingWriter
        if let staging, staging.staged > 0 {
            do {
                try await staging.flushStage()
            } catch {
                return RelayReport(ending: .processGone, bytes: relayed, undelivered: UInt64(staging.staged))
            }
        }
        while true {
            await stream.waitReceivable()
            if Task.isCancelled { return RelayReport(ending: .cancelled, bytes: relayed, undelivered: 0) }
            let buffer = pool.take()
            defer { pool.recycle(buffer) }
            let count = await stream.receive(into: buffer.bytes)
            if count == 0 {
                let ending: RelayReport.Ending = Task.isCancelled ? .cancelled : .endOfStream
                return RelayReport(ending: ending, bytes: relayed, undelivered: 0)
            }
            let bytes = UnsafeRawBufferPointer(rebasing: buffer.bytes[..<count])
            if let staging {
                do {
                    try await deliver(bytes, through: staging, for: stream)
                    relayed &+= UInt64(count)
                } catch {
                    // Staged bytes the process no longer takes are counted too: they never got in.
                    let inside = error.accepted - staging.staged
                    return RelayReport(ending: .processGone, bytes: relayed + UInt64(inside), undelivered: UInt64(count - inside))
                }
            } else {
                stream.willDeliver(count, stageLevel: nil)
                do {
                    try await sink.write(bytes)
                    stream.delivered(count)
                    relayed &+= UInt64(count)
                } catch {
                    stream.delivered(error.accepted)
                    return RelayReport(
                        ending: .processGone, bytes: relayed + UInt64(error.accepted),
                        undelivered: UInt64(count - error.accepted))
                }
            }
            sinceYield += max(count, smallestCharge)
            if sinceYield >= yieldEvery {
                sinceYield = 0
                await Task.yield()
            }
        }
    }

    /// Puts `bytes` in the stage, each time recording the stage's level first, and moves them on
    /// into the process's pipe. A crash inside a staging write is settled afterwards by the level
    /// found (`StreamCheckpoint.Recovered.settled`); bytes in the stage are delivered — they
    /// reach the process whichever broker moves them on. A failure counts the bytes staged.
    private static func deliver(
        _ bytes: UnsafeRawBufferPointer, through staging: any StagingWriter, for stream: some InboundStream
    ) async throws(WriteFailure) {
        var done = 0
        while done < bytes.count {
            stream.willDeliver(bytes.count - done, stageLevel: staging.staged)
            let staged: Int
            do {
                staged = try staging.stage(UnsafeRawBufferPointer(rebasing: bytes[done...]))
            } catch {
                stream.delivered(error.accepted)
                throw WriteFailure(accepted: done + error.accepted, cause: error.cause)
            }
            stream.delivered(staged)
            done += staged
            do {
                try await staging.flushStage()
            } catch {
                throw WriteFailure(accepted: done, cause: error.cause)
            }
        }
    }

    /// A relay that always finds data and room lets other tasks on its executor run after this
    /// many bytes (relays share the reactor's thread: one busy stream must not starve the rest).
    static let yieldEvery = 4 << 20
    /// What each pass counts toward `yieldEvery` at least: a pipe its writer made packetized
    /// (O_DIRECT) gives one packet a read, one byte if the writer writes bytes, and counted by
    /// bytes such a relay held the loop for 4 Mi reads while every other stream waited (and
    /// past a second the watchdog took it for a stuck syscall). At least 64 KiB: a yield every
    /// 64 passes at most.
    static let smallestCharge = 64 << 10

    private static func finish(_ stream: some OutboundStream, relayed: UInt64) async -> RelayReport {
        let undelivered = await stream.finish()
        return RelayReport(
            ending: undelivered == 0 ? .endOfStream : .abandoned,
            bytes: relayed - min(relayed, undelivered), undelivered: undelivered)
    }

    /// Reads what is left in a source without waiting, to count it. Bounded: stops at
    /// end-of-file, at an empty source, or after 1 GiB.
    private static func countRemaining(_ source: some ByteReader, pool: BufferPool) -> UInt64 {
        let buffer = pool.take()
        defer { pool.recycle(buffer) }
        var total: UInt64 = 0
        while total < 1 << 30, let count = try? source.readNow(into: buffer.bytes), count > 0 {
            total &+= UInt64(count)
        }
        return total
    }
}
