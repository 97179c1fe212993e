/// A terminal's size in character cells (and optionally pixels), as TIOCSWINSZ takes it.
public struct WindowSize: Sendable, Equatable, Codable {
    public var rows: UInt16
    public var columns: UInt16

    public init(rows: UInt16, columns: UInt16) {
        self.rows = rows
        self.columns = columns
    }
}

/// Relays a pty master both ways: master → output stream and input stream → master.
///
/// The terminal lives as long as its output: when the last slave fd closes (the process and its
/// children exited) the master reads end-of-file/EIO, the output stream is finished, and the input
/// relay is cancelled — a tty has no separate "stdin closed" that should keep it alive.
public enum TtyRelay {
    public struct Report: Sendable, Equatable {
        public var output: RelayReport
        public var input: RelayReport
    }

    public static func run(
        master: some ByteReader & ByteWriter,
        output: some OutboundStream,
        input: some InboundStream,
        pool: BufferPool = .shared
    ) async -> Report {
        await run(reading: master, writing: master, output: output, input: input, pool: pool)
    }

    /// The master read through one object and written through another (its windows: see
    /// `ByteReader.fillWindow` and `StagingWriter`).
    public static func run(
        reading source: some ByteReader,
        writing sink: some ByteWriter,
        output: some OutboundStream,
        input: some InboundStream,
        pool: BufferPool = .shared
    ) async -> Report {
        await withTaskGroup(of: (Bool, RelayReport).self) { group in
            group.addTask { (true, await Relay.output(from: source, to: output, pool: pool)) }
            group.addTask { (false, await Relay.input(from: input, to: sink, pool: pool)) }
            var outputReport: RelayReport?
            var inputReport: RelayReport?
            while let (isOutput, report) = await group.next() {
                if isOutput {
                    outputReport = report
                    group.cancelAll()
                } else {
                    inputReport = report
                }
            }
            return Report(output: outputReport!, input: inputReport!)
        }
    }
}
