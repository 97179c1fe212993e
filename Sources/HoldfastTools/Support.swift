import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// A plain lock for the tools' small bits of shared state.
final class NIOLockedBox: Sendable {
    private let lock = NIOLock()
    func with<T>(_ body: () throws -> T) rethrows -> T { try lock.withLock(body) }
}

func makeTemporaryDirectory(_ prefix: String = "holdfast") throws -> String {
    let base = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
    var template = Array("\(base)/\(prefix).XXXXXX".utf8CString)
    let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) != nil }
    guard made else { throw SystemError.last("mkdtemp") }
    return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// A stream's secret in a file, as `holdfast pipe` and `holdfast receive --mode resumable` share
/// it: hex digits (whitespace around them ignored), the file readable by its owner only. Never
/// on the command line, where `ps` would show it.
public enum SecretFile {
    public enum Failure: Error, CustomStringConvertible {
        case missing(String)
        case unsafe(String, String)
        case invalid(String, String)
        case cannotCreate(String, String)

        public var description: String {
            switch self {
            case .missing(let path): return "\(path): no such file (the stream's secret: 'holdfast receive --secret-file \(path)' creates it)"
            case .unsafe(let path, let why): return "\(path): \(why) (a secret file must be readable by its owner only: chmod 600 \(path))"
            case .invalid(let path, let why): return "\(path): \(why)"
            case .cannotCreate(let path, let why): return "\(path): cannot create the secret file: \(why)"
            }
        }
    }

    /// Reads the secret; refuses a file group or others can read or write.
    public static func read(_ path: String) throws(Failure) -> StreamSecret {
        var info = stat()
        guard stat(path, &info) == 0 else { throw .missing(path) }
        guard info.st_mode & 0o077 == 0 else {
            throw .unsafe(path, "mode \(String(info.st_mode & 0o777, radix: 8)) lets others read it")
        }
        guard let bytes = WholeFile.read(path) else { throw .missing(path) }
        let text = String(decoding: bytes, as: UTF8.self).filter { !$0.isWhitespace }
        do throws(StreamSecretError) {
            return try StreamSecret(hex: text)
        } catch {
            throw .invalid(path, error.description)
        }
    }

    /// The secret in `path`, made (32 random bytes, mode 0600) if the file does not exist yet.
    /// Made whole before it appears: written to a file of its own in the same directory, then
    /// linked to `path` (which fails if another made it first). Created in place, a `pipe`
    /// started beside `receive` could find it existing and still empty, and refuse it (a loaded
    /// run of the README's example did).
    public static func readOrCreate(_ path: String) throws(Failure) -> StreamSecret {
        if access(path, F_OK) == 0 { return try read(path) }
        let secret = StreamSecret.random()
        let directory = path.lastIndex(of: "/").map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        let staging = directory + "/.holdfast-secret-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(staging, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .cannotCreate(path, String(cString: strerror(errno))) }
        defer { unlink(staging) }
        let text = Array((secret.hex + "\n").utf8)
        let written = text.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        let writeError = errno
        close(fd)
        guard written == text.count else { throw .cannotCreate(path, String(cString: strerror(writeError))) }
        guard link(staging, path) == 0 else {
            let linkError = errno
            if linkError == EEXIST { return try read(path) }
            // A file system without hard links: made in place, as far as that goes.
            guard linkError == EPERM || linkError == EOPNOTSUPP else { throw .cannotCreate(path, String(cString: strerror(linkError))) }
            return try createInPlace(path, text: text, secret: secret)
        }
        return secret
    }

    private static func createInPlace(_ path: String, text: [UInt8], secret: StreamSecret) throws(Failure) -> StreamSecret {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        if fd < 0 {
            guard errno == EEXIST else { throw .cannotCreate(path, String(cString: strerror(errno))) }
            return try read(path)
        }
        defer { close(fd) }
        guard text.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == text.count else {
            throw .cannotCreate(path, String(cString: strerror(errno)))
        }
        return secret
    }
}
