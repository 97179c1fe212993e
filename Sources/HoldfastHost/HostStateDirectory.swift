import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// What host serve keeps on disk, so that a restart of it (killed, crashed, upgraded) loses
/// none of its processes: a new host serve on the same directory opens their streams again
/// with the same tokens and secrets and resumes each where the files end. The guest holds
/// every byte the host did not acknowledge, and host serve acknowledges a byte only once it is
/// in a file here, so the output resumes with nothing lost and nothing twice.
///
/// One directory per process under `processes/` (numbered in creation order):
/// - `record.json`: its id, command, terminal, each stream's token and secret, and once the
///   create returned, its pid and the guest that runs it. Written before the create goes out.
/// - `stdout.log`, `stderr.log`: the output as received: an 8-byte header (the stream offset of
///   the file's first byte, little-endian), then the bytes. Cut to the newest `--log-size` bytes
///   when it grows past twice that (at least 1 MiB).
/// - `stdin.offset`: how many stdin bytes were handed to the stream, written before they are;
///   `stdin.ended` once the client ended stdin (its socket read to the end).
/// - `stdout.ended`, `stderr.ended`: that output's END arrived (written before the guest is
///   told so): a new host serve does not open it again.
/// - `outcome.json`: its exit or loss, written before the exit is acknowledged to the guest.
/// - `finished`: outcome and output handed over; kept for `wait`, `ps -a` and `logs`.
///
/// Not covered: a crash of the host machine itself (nothing is fsynced: a process dying keeps
/// what it wrote, the page cache does not).
final class HostStateDirectory: Sendable {
    let path: String
    private let lockFD: Int32
    private let nextNumber: Synchronization.Atomic<UInt64>

    /// Takes the directory (created 0700 if missing); refused if another host serve has it.
    init(path: String) throws(HoldfastError) {
        self.path = path
        for directory in [path, path + "/processes"] {
            guard mkdir(directory, 0o700) == 0 || errno == EEXIST else {
                throw HoldfastError(.localFailed, "cannot create the state directory \(directory): \(SystemError.last("mkdir"))")
            }
        }
        // Only this user (or root) may change what is in it: it holds the streams' secrets, and
        // a file planted there would be taken up as a process of ours.
        do throws(RunDirectory.Refusal) {
            try RunDirectory.check(path, acceptedOwners: [geteuid()])
        } catch {
            throw HoldfastError(.localFailed, "refusing the state directory: \(error)")
        }
        let fd = open(path + "/lock", O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw HoldfastError(.localFailed, "cannot open \(path)/lock: \(SystemError.last("open"))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            throw HoldfastError(.localFailed, "the state directory \(path) is in use by another host serve (its lock file is held)")
        }
        lockFD = fd
        let highest = (DirectoryListing.names(path + "/processes") ?? []).compactMap { UInt64($0) }.max() ?? 0
        nextNumber = Synchronization.Atomic(highest)
    }

    deinit { close(lockFD) }

    /// A new process's directory.
    func newProcess() throws(HoldfastError) -> ProcessFiles {
        let number = nextNumber.wrappingAdd(1, ordering: .relaxed).newValue
        let directory = path + "/processes/" + Self.name(number)
        guard mkdir(directory, 0o700) == 0 else {
            throw HoldfastError(.localFailed, "cannot create \(directory): \(SystemError.last("mkdir"))")
        }
        return ProcessFiles(directory: directory, number: number)
    }

    /// The directory of process `number`.
    func files(_ number: UInt64) -> ProcessFiles {
        ProcessFiles(directory: path + "/processes/" + Self.name(number), number: number)
    }

    static func name(_ number: UInt64) -> String {
        let digits = String(number)
        return String(repeating: "0", count: max(0, 10 - digits.count)) + digits
    }

    /// Every process kept, oldest first. What cannot be read is said and removed: a directory
    /// whose record was never written is a create that never went out.
    func restore(say: (String) -> Void) -> [RestoredProcess] {
        let numbers = (DirectoryListing.names(path + "/processes") ?? []).compactMap { UInt64($0) }.sorted()
        var restored: [RestoredProcess] = []
        for number in numbers {
            let files = ProcessFiles(directory: path + "/processes/" + Self.name(number), number: number)
            files.removeLeftovers()
            guard let bytes = WholeFile.read(files.directory + "/record.json") else {
                // A create that never went out has no output; one with output whose record went
                // (a /tmp cleaner aging it out) is left for the operator, not deleted.
                if files.hasOutput {
                    say("warning: \(files.directory) has output but no record.json: left as it is (not taken up)")
                } else {
                    files.remove()
                }
                continue
            }
            guard let record = try? ControlJSON.decode(HostProcessRecord.self, from: bytes, frameType: 0), record.isSound else {
                say("warning: \(files.directory)/record.json is not a record host serve wrote: left as it is (not taken up)")
                continue
            }
            let outcome = WholeFile.read(files.directory + "/outcome.json").flatMap {
                try? ControlJSON.decode(HostWaitResponse.self, from: $0, frameType: 0)
            }
            let finished = access(files.directory + "/finished", F_OK) == 0
            restored.append(RestoredProcess(files: files, record: record, outcome: outcome, finished: finished && outcome != nil))
        }
        return restored
    }
}

/// A process as a new host serve found it.
struct RestoredProcess: Sendable {
    let files: ProcessFiles
    let record: HostProcessRecord
    let outcome: HostWaitResponse?
    /// Its outcome and output had been handed over.
    let finished: Bool
}

/// What host serve must know of a process to reach it again after its own restart.
struct HostProcessRecord: Codable, Sendable {
    struct Stream: Codable, Sendable {
        var kind: String
        var token: String
        var secret: StreamSecret
    }

    var id: String
    var command: String?
    var tty: Bool
    var streams: [Stream]
    /// Set once the create returned.
    var pid: Int32?
    var bootID: String?
    var instanceID: String?
    /// The create as sent, with its idempotency key: a host serve killed before the reply sends
    /// it again, and the guest answers with the first one's pid (or starts it, if it never came).
    var spec: ProcessSpec?

    static let streamKinds: Set<String> = ["stdin", "stdout", "stderr"]

    /// Names only streams a process has, each once (a kind is part of a file's name).
    var isSound: Bool {
        !id.isEmpty && streams.allSatisfy { Self.streamKinds.contains($0.kind) } && Set(streams.map(\.kind)).count == streams.count
    }
}

/// One process's directory (`HostStateDirectory`).
final class ProcessFiles: Sendable {
    let directory: String
    let number: UInt64
    /// One write at a time: the bridge's reader and a relay may both write the outcome.
    private let writing = NIOLock()

    init(directory: String, number: UInt64) {
        self.directory = directory
        self.number = number
    }

    func write(_ record: HostProcessRecord) throws(HoldfastError) {
        try replace("record.json", ControlJSON.encode(record))
    }

    func write(_ outcome: HostWaitResponse) throws(HoldfastError) {
        try replace("outcome.json", ControlJSON.encode(outcome))
    }

    /// Writes the outcome `current` gives at the moment of writing (writes are one at a time,
    /// so the last one written is the newest).
    func writeOutcome(_ current: () -> HostWaitResponse?) throws(HoldfastError) {
        writing.lock()
        defer { writing.unlock() }
        guard let outcome = current() else { return }
        try replaceUnlocked("outcome.json", ControlJSON.encode(outcome))
    }

    /// The guest ended output `kind` (its END arrived): a new host serve does not wait for it.
    func markEnded(_ kind: String) throws(HoldfastError) {
        try replace("\(kind).ended", [])
    }

    func hasEnded(_ kind: String) -> Bool { access(directory + "/\(kind).ended", F_OK) == 0 }

    /// Whether any output was kept (more than a log's header).
    var hasOutput: Bool {
        ["stdout", "stderr"].contains { kind in
            var info = stat()
            return lstat(directory + "/\(kind).log", &info) == 0 && info.st_size > OutputLogFile.headerSize
        }
    }

    func markFinished() {
        try? replace("finished", [])
    }

    func markStdinEnded() throws(HoldfastError) {
        try replace("stdin.ended", [])
    }

    var stdinEnded: Bool { access(directory + "/stdin.ended", F_OK) == 0 }

    /// The output file of `kind`, made (at offset 0) if missing.
    func outputLog(_ kind: String, keep: Int) throws(HoldfastError) -> OutputLogFile {
        try OutputLogFile(path: directory + "/\(kind).log", keep: keep)
    }

    /// The output kept of a finished process, if any.
    func existingOutputLog(_ kind: String, keep: Int) -> OutputLogFile? {
        guard access(directory + "/\(kind).log", F_OK) == 0 else { return nil }
        return try? OutputLogFile(path: directory + "/\(kind).log", keep: keep)
    }

    func inputOffset() throws(HoldfastError) -> InputOffsetFile {
        try InputOffsetFile(path: directory + "/stdin.offset")
    }

    /// Drops the output files (the log is no longer among those kept).
    func removeLogs() {
        for kind in ["stdout", "stderr"] { unlink(directory + "/\(kind).log") }
    }

    func remove() { FileTree.remove(directory) }

    /// A write that a crash cut short leaves a `.tmp` file; the file it was to replace stands.
    func removeLeftovers() {
        for name in DirectoryListing.names(directory) ?? [] where name.hasSuffix(".tmp") || name.hasSuffix(".cut") { unlink(directory + "/" + name) }
    }

    /// Writes `name` whole or not at all (a temporary file renamed over it).
    private func replace(_ name: String, _ bytes: [UInt8]) throws(HoldfastError) {
        writing.lock()
        defer { writing.unlock() }
        try replaceUnlocked(name, bytes)
    }

    private func replaceUnlocked(_ name: String, _ bytes: [UInt8]) throws(HoldfastError) {
        let path = directory + "/" + name
        try writeWhole(path + ".tmp", bytes)
        guard rename(path + ".tmp", path) == 0 else {
            throw HoldfastError(.localFailed, "cannot write \(path): \(SystemError.last("rename"))")
        }
    }
}

/// One output stream's bytes as host serve received them (`HostStateDirectory`).
final class OutputLogFile: Sendable {
    private struct State: Sendable {
        var fd: Int32
        /// The stream offset of the file's first byte.
        var base: UInt64
        /// Bytes after the header.
        var size: UInt64
        var closed = false
        /// The size past which the next cut is tried (a failed one is not tried again at every
        /// chunk: each would copy up to `keep` bytes).
        var cutAbove: UInt64
    }

    static let headerSize = 8
    let path: String
    /// The newest bytes kept when the file is cut.
    let keep: Int
    private let state: NIOLockedValueBox<State>

    /// Opens the file, creating it (offset 0) if missing.
    init(path: String, keep: Int) throws(HoldfastError) {
        self.path = path
        self.keep = keep
        if access(path, F_OK) != 0 { try Self.create(path, base: 0, tail: []) }
        let fd = open(path, O_RDWR | O_APPEND | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { throw HoldfastError(.localFailed, "cannot open \(path): \(SystemError.last("open"))") }
        var header = [UInt8](repeating: 0, count: Self.headerSize)
        var info = stat()
        guard pread(fd, &header, Self.headerSize, 0) == Self.headerSize, fstat(fd, &info) == 0 else {
            Glibc.close(fd)
            throw HoldfastError(.localFailed, "\(path) has no header: not a holdfast output log")
        }
        let base = header.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        let size = UInt64(info.st_size) - UInt64(Self.headerSize)
        guard base <= UInt64.max - size, (info.st_mode & S_IFMT) == S_IFREG else {
            Glibc.close(fd)
            throw HoldfastError(.localFailed, "\(path) is not a holdfast output log (its header names an offset past 2^64)")
        }
        state = NIOLockedValueBox(State(fd: fd, base: base, size: size, cutAbove: Self.cutThreshold(keep)))
    }

    private static func create(_ path: String, base: UInt64, tail: [UInt8]) throws(HoldfastError) {
        let header = (0..<headerSize).map { UInt8(truncatingIfNeeded: base >> (8 * UInt64($0))) }
        try writeWhole(path + ".tmp", header + tail)
        guard rename(path + ".tmp", path) == 0 else {
            throw HoldfastError(.localFailed, "cannot write \(path): \(SystemError.last("rename"))")
        }
    }

    deinit {
        let fd = state.withLockedValue { $0.fd }
        if fd >= 0 { Glibc.close(fd) }
    }

    /// The stream offset after the last byte kept: where a new host serve resumes.
    var end: UInt64 { state.withLockedValue { $0.base + $0.size } }

    static func cutThreshold(_ keep: Int) -> UInt64 { UInt64(max(2 * keep, 1 << 20)) }

    /// What `append` did.
    enum Appended: Sendable, Equatable {
        case all
        /// The first `written` bytes went in (counted: a restart resumes after them); the rest
        /// could not (a full disk), for the reason given.
        case part(written: Int, reason: String)
        /// The file was closed (its stream ended here).
        case closed
    }

    /// Keeps `bytes`, or as many as it can. The caller tells the guest a byte arrived only once
    /// it is kept, and offers the rest again later: the guest holds what is not acknowledged,
    /// so a full disk holds the stream back rather than losing bytes at the next restart.
    func append(_ bytes: ArraySlice<UInt8>) -> Appended {
        state.withLockedValue { s in
            guard !s.closed else { return .closed }
            var offset = 0
            while offset < bytes.count {
                let count = bytes[(bytes.startIndex + offset)...].withUnsafeBytes { Glibc.write(s.fd, $0.baseAddress, $0.count) }
                if count < 0 && errno == EINTR { continue }
                guard count > 0 else {
                    let reason = "\(SystemError.last("write(\(path))"))"
                    s.size += UInt64(offset)
                    return .part(written: offset, reason: reason)
                }
                offset += count
            }
            s.size += UInt64(bytes.count)
            if s.size > s.cutAbove { cut(&s) }
            return .all
        }
    }

    /// Keeps only the newest `keep` bytes (a new file renamed over the old one), copied a MiB
    /// at a time (a `--log-size` of a GiB must not take a GiB of memory).
    private func cut(_ s: inout State) {
        // Tried again only once another `keep` bytes came, if this one fails.
        s.cutAbove = s.size + UInt64(max(keep, 1 << 20))
        let kept = min(UInt64(keep), s.size)
        let base = s.base + s.size - kept
        guard (try? Self.create(path + ".cut", base: base, tail: [])) != nil else { return }
        // Opened before the rename, read-write: it becomes the file's fd once renamed over it
        // (reopening by name after could fail, leaving writes to the old, unlinked file).
        let out = open(path + ".cut", O_RDWR | O_APPEND | O_NOFOLLOW | O_CLOEXEC)
        guard out >= 0 else { return }
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        var copied: UInt64 = 0
        while copied < kept {
            let want = Int(min(UInt64(chunk.count), kept - copied))
            let offset = off_t(UInt64(Self.headerSize) + s.size - kept + copied)
            let read = pread(s.fd, &chunk, want, offset)
            guard read == want, chunk.withUnsafeBytes({ Glibc.write(out, $0.baseAddress, want) }) == want else {
                Glibc.close(out)
                unlink(path + ".cut")
                return
            }
            copied += UInt64(want)
        }
        guard rename(path + ".cut", path) == 0 else {
            Glibc.close(out)
            unlink(path + ".cut")
            return
        }
        Glibc.close(s.fd)
        s.fd = out
        s.base = base
        s.size = kept
    }

    /// The newest `count` bytes kept, at most.
    func tail(_ count: Int) -> [UInt8] {
        state.withLockedValue { s in
            let kept = Int(min(UInt64(count), s.size))
            var bytes = [UInt8](repeating: 0, count: kept)
            let read = pread(s.fd, &bytes, kept, off_t(UInt64(Self.headerSize) + s.size - UInt64(kept)))
            return read == kept ? bytes : []
        }
    }

    func close() {
        state.withLockedValue { s in
            if s.fd >= 0 { Glibc.close(s.fd) }
            s.fd = -1
            s.closed = true
        }
    }
}

/// How many bytes host serve handed to a process's stdin stream (`HostStateDirectory`): counted
/// before each hand-over, so a new host serve's stream starts at or beyond anything the guest
/// may have received, and the guest counts any bytes between as lost (a gap), never a repeat.
final class InputOffsetFile: Sendable {
    private let fd: Int32
    private let count: NIOLockedValueBox<UInt64>

    init(path: String) throws(HoldfastError) {
        fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw HoldfastError(.localFailed, "cannot open \(path): \(SystemError.last("open"))") }
        var bytes = [UInt8](repeating: 0, count: 8)
        let read = pread(fd, &bytes, 8, 0)
        count = NIOLockedValueBox(read == 8 ? bytes.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) } : 0)
    }

    deinit { close(fd) }

    /// Bytes handed over so far.
    var value: UInt64 { count.withLockedValue { $0 } }

    /// `bytes` more are about to be handed over. False if that could not be written down.
    @discardableResult
    func advance(by bytes: Int) -> Bool {
        count.withLockedValue { total in
            let next = total + UInt64(bytes)
            let encoded = (0..<8).map { UInt8(truncatingIfNeeded: next >> (8 * UInt64($0))) }
            guard pwrite(fd, encoded, 8, 0) == 8 else { return false }
            total = next
            return true
        }
    }
}

/// Creates or truncates `path` (never through a symbolic link) and writes every byte.
private func writeWhole(_ path: String, _ bytes: [UInt8]) throws(HoldfastError) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw HoldfastError(.localFailed, "cannot write \(path): \(SystemError.last("open"))") }
    defer { close(fd) }
    var offset = 0
    while offset < bytes.count {
        let count = bytes[offset...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        if count < 0 && errno == EINTR { continue }
        guard count > 0 else { throw HoldfastError(.localFailed, "cannot write \(path): \(SystemError.last("write"))") }
        offset += count
    }
}
