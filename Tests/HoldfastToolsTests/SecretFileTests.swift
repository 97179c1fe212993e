import HoldfastProtocol
import HoldfastTestSupport
import Testing

@testable import HoldfastTools

#if canImport(Glibc)
import Glibc
#endif

/// `receive --secret-file` makes the file a `pipe` started beside it reads as soon as it exists
/// (README: `receive ... &` then `pipe ...`). Created in place and then written, it existed
/// empty for a moment, and a loaded run of that example had `pipe` refuse it ("a stream secret
/// must be 16 to 64 bytes, not 0"). Now it appears whole: the directory is watched (inotify),
/// and the secret file's name must never be written to, only linked in with its contents.
@Suite("The stream secret file")
struct SecretFileTests {
    @Test func aSecretFileAppearsWholeAndIsReadBackTheSame() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.file("s.key")
        let watch = inotify_init1(Int32(IN_CLOEXEC | IN_NONBLOCK))
        try #require(watch >= 0)
        defer { close(watch) }
        try #require(inotify_add_watch(watch, directory.path, UInt32(IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE)) >= 0)

        let made = try SecretFile.readOrCreate(path)
        let events = Self.events(watch).filter { $0.name == "s.key" }
        #expect(events.contains { $0.mask & UInt32(IN_CREATE) != 0 }, "the file appeared: \(events)")
        #expect(!events.contains { $0.mask & UInt32(IN_MODIFY | IN_CLOSE_WRITE) != 0 }, "never written where a reader finds it: \(events)")
        #expect(try SecretFile.read(path) == made)
        #expect(try SecretFile.readOrCreate(path) == made, "an existing file is read, not replaced")
        var info = stat()
        #expect(stat(path, &info) == 0 && info.st_mode & 0o777 == 0o600)
        #expect(ProcessAccount.entryNames(directory.path).sorted() == ["s.key"], "nothing else left in the directory")
    }

    struct Event: CustomStringConvertible {
        var mask: UInt32
        var name: String
        var description: String { "\(name): 0x\(String(mask, radix: 16))" }
    }

    /// Every event queued on `watch` so far.
    static func events(_ watch: Int32) -> [Event] {
        var events: [Event] = []
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        let count = buffer.withUnsafeMutableBytes { read(watch, $0.baseAddress, $0.count) }
        guard count > 0 else { return [] }
        var offset = 0
        let header = MemoryLayout<inotify_event>.size
        while offset + header <= count {
            let (mask, length) = buffer.withUnsafeBytes { raw in
                (raw.load(fromByteOffset: offset + 4, as: UInt32.self), Int(raw.load(fromByteOffset: offset + 12, as: UInt32.self)))
            }
            let nameBytes = buffer[(offset + header)..<(offset + header + length)].prefix { $0 != 0 }
            events.append(Event(mask: mask, name: String(decoding: nameBytes, as: UTF8.self)))
            offset += header + length
        }
        return events
    }
}
