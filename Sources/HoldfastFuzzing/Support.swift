import HoldfastCore
import HoldfastProtocol
import HoldfastPosix
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// A connection that delivers a fixed input in pieces of varying size (so a frame often arrives
/// in several reads, as on a socket), then end-of-file; what is written to it is dropped.
final class ScriptedConnection: ByteConnection {
    private struct State {
        var input: [UInt8]
        var answered = false
        var position = 0
        var reads = 0
        var closed = false
    }

    private var input: [UInt8] { state.withLockedValue { $0.input } }
    private let state: NIOLockedValueBox<State>
    /// For a dialing end under test: answers its hello (the first write) with bytes that go
    /// before the script (a host's signed hello).
    private let answering: (@Sendable (StreamHello) -> [UInt8])?

    init(_ input: [UInt8], answering: (@Sendable (StreamHello) -> [UInt8])? = nil) {
        state = NIOLockedValueBox(State(input: input))
        self.answering = answering
    }

    func waitReadable() async throws {}

    func read(into buffer: UnsafeMutableRawBufferPointer) async throws -> Int {
        try readNow(into: buffer) ?? 0
    }

    func readNow(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? {
        state.withLockedValue { s in
            let input = s.input
            let remaining = input.count - s.position
            guard !s.closed, remaining > 0, buffer.count > 0 else { return 0 }
            s.reads += 1
            // 1 to 23 bytes, and every fourth read all that is left.
            let piece = s.reads % 4 == 0 ? remaining : 1 + (s.reads * 7) % 23
            let count = min(buffer.count, remaining, piece)
            input.withUnsafeBytes { source in
                buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: source[s.position..<s.position + count]))
            }
            s.position += count
            return count
        }
    }

    func write(_ bytes: UnsafeRawBufferPointer) async throws(WriteFailure) {
        guard let answering, !state.withLockedValue({ $0.answered }) else { return }
        // The dialer's first write is its hello.
        let written = Array(bytes)
        guard written.count >= StreamFramePrefix.size,
            let prefix = try? written.withUnsafeBytes({ try StreamFramePrefix.decode($0) }),
            let hello = try? StreamHello.decode(prefix: prefix, body: Array(written[StreamFramePrefix.size...]))
        else { return }
        let answer = answering(hello)
        state.withLockedValue { s in
            s.answered = true
            s.input = answer + s.input
        }
    }

    func close() {
        state.withLockedValue { $0.closed = true }
    }
}

/// Files for the config target: unique per process and call, removed after each input.
enum TemporaryFile {
    private static let counter = NIOLockedValueBox(0)

    static func write(_ bytes: [UInt8], suffix: String) -> String? {
        let number = counter.withLockedValue { n -> Int in
            n += 1
            return n
        }
        let directory = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
        let path = "\(directory)/holdfast-fuzz-\(getpid())-\(number)\(suffix)"
        do throws(SystemError) {
            try WholeFile.write(path, bytes, mode: 0o600)
        } catch {
            unlink(path)
            return nil
        }
        return path
    }

    static func remove(_ path: String) {
        unlink(path)
    }
}

/// Fuzz inputs on disk: the seed corpus (fuzz/corpus/<target>/) and the crashes found
/// (fuzz/crashes/<target>/), for the replayer and the regression tests.
public enum FuzzInputs {
    /// The files at `path` (a file, or a directory's regular files, sorted by name) with their
    /// bytes; a path that cannot be read gives none.
    public static func load(_ path: String) -> [(path: String, bytes: [UInt8])] {
        var info = stat()
        guard stat(path, &info) == 0 else { return [] }
        if info.st_mode & S_IFMT != S_IFDIR {
            return WholeFile.read(path).map { [(path, $0)] } ?? []
        }
        guard let directory = opendir(path) else { return [] }
        defer { closedir(directory) }
        var names: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if !name.hasPrefix(".") { names.append(name) }
        }
        return names.sorted().flatMap { load("\(path)/\($0)") }
    }
}
