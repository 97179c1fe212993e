import HoldfastProtocol
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// The daemon's log lines on stderr: under systemd (its journal is on stderr, `JOURNAL_STREAM`
/// is set) each line starts with a syslog priority prefix (`<3>` for errors...) and carries no
/// timestamp, since journald adds both its own; anywhere else, plain text with a timestamp.
/// Metadata (process, stream, role, pid...) follows as `key=value`, sorted, so lines grep well.
public struct DaemonLogHandler: LogHandler {
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    let label: String
    let journal: Bool

    public init(label: String, journal: Bool = DaemonLogHandler.stderrIsTheJournal) {
        self.label = label
        self.journal = journal
    }

    /// systemd sets JOURNAL_STREAM to "DEVICE:INODE" of the stream it connected; it is our
    /// stderr only if those match (a child of a journald-connected shell inherits the variable).
    public static var stderrIsTheJournal: Bool {
        guard let value = getenv("JOURNAL_STREAM").map({ String(cString: $0) }) else { return false }
        let parts = value.split(separator: ":")
        var info = stat()
        guard parts.count == 2, fstat(2, &info) == 0 else { return false }
        return parts[0] == String(info.st_dev) && parts[1] == String(info.st_ino)
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var merged = metadata
        if let provided = metadataProvider?.get() { merged.merge(provided) { $1 } }
        if let extra = event.metadata { merged.merge(extra) { $1 } }
        let line = Self.format(
            level: event.level, label: label, message: "\(event.message)", metadata: merged, journal: journal,
            timestamp: journal ? nil : Self.timestamp())
        var bytes = Array(line.utf8)
        bytes.append(UInt8(ascii: "\n"))
        // Queued, never written here: a log nobody reads must not hold the thread that logs.
        Self.queue.append(bytes)
    }

    /// Where every line of this process goes: stderr, through a writer thread of its own; at
    /// most 1 MiB waits while stderr is not read, beyond that lines are dropped and counted.
    public static let queue = LogLineQueue(descriptor: 2, capacity: 1 << 20) { count in
        let journal = stderrIsTheJournal
        return format(
            level: .warning, label: "holdfast.log",
            message: "\(count) log line\(count == 1 ? "" : "s") dropped: stderr was not being read (the journal stopped or too slow)",
            metadata: ["pid": "\(getpid())"], journal: journal, timestamp: journal ? nil : timestamp())
    }

    /// Writes what is queued before the process ends or replaces its image, waiting at most
    /// `milliseconds` for a reader that does not read.
    public static func flush(withinMilliseconds milliseconds: Int = 1000) {
        queue.flush(withinMilliseconds: milliseconds)
    }

    /// One log line (pure, tested apart).
    static func format(
        level: Logger.Level, label: String, message: String, metadata: Logger.Metadata, journal: Bool, timestamp: String?
    ) -> String {
        let fields = metadata.sorted { $0.key < $1.key }.map { "\($0.key)=\(clipped(escapingControls("\($0.value)"), to: valueLimit))" }
            .joined(separator: " ")
        let said = clipped(escapingControls(message), to: messageLimit)
        let body = clipped(fields.isEmpty ? said : "\(said) \(fields)", to: lineLimit)
        if journal { return "<\(priority(level))>\(label): \(body)" }
        return "\(timestamp ?? "") \(level) \(label): \(body)"
    }

    /// The most a value, a message and a whole line may take, in UTF-8 bytes. journald splits a
    /// line past its `LineMax` (48 KiB) and reads a priority prefix again at the start of each
    /// piece: a host's argv (up to 64 KiB in "process started") or runc's error text placed so
    /// that `<0>holdfast.supervisor: ...` began at the split forged an entry at any priority. A
    /// value is clipped on its own, so the keys after a long one (`id` after `argv`) still show.
    static let valueLimit = 2048
    static let messageLimit = 4096
    static let lineLimit = 32 << 10

    /// `text` cut to at most `limit` UTF-8 bytes (at a character's boundary), saying how much was
    /// left out.
    static func clipped(_ text: String, to limit: Int) -> String {
        let length = text.utf8.count
        guard length > limit else { return text }
        var kept = String.UnicodeScalarView()
        var used = 0
        let room = limit - 32  // for the note
        for scalar in text.unicodeScalars {
            let size = String(scalar).utf8.count
            if used + size > room { break }
            kept.append(scalar)
            used += size
        }
        return String(kept) + "…(\(length - used) bytes more)"
    }

    /// `text` with its control characters written out (`\n`, `\u{1b}`): a line carries what
    /// others chose (an id a runtime named, runc's error text, a peer's reason), and a newline
    /// in it began a journal entry of its own (`<2>holdfast.supervisor: ...`, forged at any
    /// priority), an escape sequence reached the terminal of whoever read the log.
    static func escapingControls(_ text: String) -> String { TerminalText.escaped(text) }

    /// The syslog priority sd-daemon(3) prefixes use.
    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: return 7
        case .info: return 6
        case .notice: return 5
        case .warning: return 4
        case .error: return 3
        case .critical: return 2
        }
    }

    /// The time of day as the daemon's log lines start (UTC, milliseconds): a tool that prints
    /// beside the log uses it, so its lines can be matched with the log's.
    public static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var parts = tm()
        var seconds = now.tv_sec
        gmtime_r(&seconds, &parts)
        var buffer = [CChar](repeating: 0, count: 32)
        let count = strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S", &parts)
        let millis = now.tv_nsec / 1_000_000
        let base = String(decoding: buffer[..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return base + "." + String(repeating: "0", count: millis < 10 ? 2 : millis < 100 ? 1 : 0) + String(millis) + "Z"
    }

    /// Installs the handler for the whole process (once, at start-up), at `level`.
    public static func bootstrap(level: Logger.Level = .info) {
        LoggingSystem.bootstrap { label in
            var handler = DaemonLogHandler(label: label)
            handler.logLevel = level
            return handler
        }
    }
}
