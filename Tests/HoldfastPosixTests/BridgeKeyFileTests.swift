import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("The bridge key's file: what is accepted, what is refused and why", .timeLimit(.minutes(5)))
struct BridgeKeyFileTests {
    let good = Array("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n".utf8)

    func withDirectory(_ body: (TemporaryDirectory) throws -> Void) throws {
        let directory = try TemporaryDirectory("holdfast-key")
        defer { directory.remove() }
        try body(directory)
    }

    func problem(_ path: String) -> BridgeKeyFile.Problem? {
        do {
            _ = try BridgeKeyFile.load(path)
            return nil
        } catch {
            return error
        }
    }

    @Test func aRootOnlyHexFileIsTheKey() throws {
        try withDirectory { directory in
            let path = directory.file("bridge.key")
            try writeFile(path, good, mode: 0o600)
            #expect(try BridgeKeyFile.load(path).bytes == Array(0..<32))
            chmod(path, 0o400)
            #expect(try BridgeKeyFile.load(path).bytes.count == 32, "read-only for its owner is fine")
        }
    }

    @Test func aMissingFileIsSaidSo() throws {
        try withDirectory { directory in
            let found = problem(directory.file("nowhere.key"))
            #expect(found?.kind == .missing)
            #expect(found?.description == "\(directory.file("nowhere.key")): no such file")
        }
    }

    @Test(arguments: [0o640, 0o604, 0o620, 0o602, 0o644, 0o666])
    func aFileOthersCanReadOrWriteIsRefused(mode: Int) throws {
        try withDirectory { directory in
            let path = directory.file("bridge.key")
            try writeFile(path, good, mode: 0o600)
            chmod(path, mode_t(mode))
            let found = problem(path)
            #expect(found?.kind == .unsafe)
            #expect(found?.description.hasPrefix("\(path): mode 0\(String(mode, radix: 8)): group or other can") == true, "\(String(describing: found))")
            #expect(found?.reason.contains("chmod 600") == true)
        }
    }

    @Test(.enabled(if: geteuid() == 0, "needs root to give the file to another user"))
    func aFileAnotherUserOwnsIsRefused() throws {
        try withDirectory { directory in
            let path = directory.file("bridge.key")
            try writeFile(path, good, mode: 0o600)
            #expect(chown(path, 65534, 65534) == 0)
            let found = problem(path)
            #expect(found?.kind == .unsafe)
            #expect(found?.reason.hasPrefix("owned by uid 65534; it must be owned by root") == true, "\(String(describing: found))")
        }
    }

    @Test func notARegularFileIsRefusedWithoutBlocking() throws {
        try withDirectory { directory in
            #expect(problem(directory.path)?.reason == "not a regular file")
            let fifo = directory.file("fifo.key")
            #expect(mkfifo(fifo, 0o600) == 0)
            #expect(problem(fifo)?.reason == "not a regular file", "opened without a writer, refused before any read")
        }
    }

    @Test func contentsThatAreNotAKeyAreRefusedWithoutBeingQuoted() throws {
        try withDirectory { directory in
            let path = directory.file("bridge.key")
            try writeFile(path, Array("sesame-open-sesame-open-sesame-open-sesame-open-sesame-open-sesame\n".utf8), mode: 0o600)
            let found = problem(path)
            #expect(found?.kind == .malformed)
            #expect(found?.description.contains("sesame") == false, "\(String(describing: found))")
            try writeFile(path, [UInt8](repeating: 0x61, count: BridgeKey.maximumFileSize + 1), mode: 0o600)
            #expect(problem(path)?.reason.contains("at most \(BridgeKey.maximumFileSize)") == true)
        }
    }

    @Test func loadOrCreateMakesAPrivateKeyOnceAndKeepsIt() throws {
        try withDirectory { directory in
            let path = directory.file("bridge.key")
            let (first, created) = try BridgeKeyFile.loadOrCreate(path)
            #expect(created)
            var info = stat()
            #expect(stat(path, &info) == 0)
            #expect(info.st_mode & 0o777 == 0o600 && info.st_uid == geteuid())
            #expect(info.st_size == 65, "64 hex digits and a newline")
            let (again, createdAgain) = try BridgeKeyFile.loadOrCreate(path)
            #expect(!createdAgain && again == first, "an existing key is never replaced")
            // An existing file is checked like any other.
            chmod(path, 0o644)
            #expect(throws: BridgeKeyFile.Problem.self) { try BridgeKeyFile.loadOrCreate(path) }
            // Never through a symlink someone planted.
            let planted = directory.file("planted.key")
            #expect(symlink(directory.file("elsewhere"), planted) == 0)
            #expect(throws: BridgeKeyFile.Problem.self) { try BridgeKeyFile.loadOrCreate(planted) }
            #expect(access(directory.file("elsewhere"), F_OK) != 0, "nothing created at the link's target")
        }
    }
}
