import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// The bridge key's file (`bridge.key_file`; README "Security"): hex digits, in a regular file
/// that only its owner can read or write, owned by root or by the user reading it. Anything
/// else is refused with the file's name and what is wrong, never with its contents.
public enum BridgeKeyFile {
    /// Why a key file cannot be used.
    public struct Problem: Error, Sendable, Equatable, CustomStringConvertible {
        public enum Kind: Sendable, Equatable {
            case missing
            case unreadable
            case unsafe
            case malformed
        }

        public var path: String
        public var kind: Kind
        public var reason: String

        public var description: String { "\(path): \(reason)" }
    }

    /// Reads and checks the key. Blocking (a small local file); never follows the file into a
    /// FIFO or a device (`O_NONBLOCK`, then a regular-file check before any read).
    public static func load(_ path: String) throws(Problem) -> BridgeKey {
        func fail(_ kind: Problem.Kind, _ reason: String) -> Problem { Problem(path: path, kind: kind, reason: reason) }
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)
        guard fd >= 0 else {
            let error = errno
            switch error {
            case ENOENT: throw fail(.missing, "no such file")
            case EACCES: throw fail(.unreadable, "permission denied (uid \(geteuid()) cannot read it)")
            default: throw fail(.unreadable, "cannot open it: \(String(cString: strerror(error)))")
            }
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw fail(.unreadable, "cannot stat it: \(String(cString: strerror(errno)))") }
        if let problem = unsafety(of: info) { throw fail(.unsafe, problem) }
        guard info.st_size <= BridgeKey.maximumFileSize else {
            throw fail(.malformed, "it is \(info.st_size) bytes; a key file holds at most \(BridgeKey.maximumFileSize)")
        }
        var contents: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: BridgeKey.maximumFileSize + 1)
        while contents.count <= BridgeKey.maximumFileSize {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                throw fail(.unreadable, "cannot read it: \(String(cString: strerror(errno)))")
            }
            if count == 0 { break }
            contents += buffer[..<count]
        }
        guard contents.count <= BridgeKey.maximumFileSize else {
            throw fail(.malformed, "it grew past \(BridgeKey.maximumFileSize) bytes while being read")
        }
        do {
            return try BridgeKey(fileContents: contents)
        } catch {
            throw fail(.malformed, error.description)
        }
    }

    /// What makes a file unfit to hold the key, or nil: not a regular file; owned by someone
    /// other than root or this process's user (they could have written a key they know); group
    /// or other may read it (they would know the key) or write it.
    public static func unsafety(of info: stat) -> String? {
        guard (info.st_mode & S_IFMT) == S_IFREG else { return "not a regular file" }
        let me = geteuid()
        guard info.st_uid == 0 || info.st_uid == me else {
            return "owned by uid \(info.st_uid); it must be owned by root\(me == 0 ? "" : " or uid \(me)") (chown it)"
        }
        let loose = info.st_mode & 0o077
        guard loose == 0 else {
            let mode = String(info.st_mode & 0o777, radix: 8)
            let who = loose & 0o044 != 0 ? "group or other can read it" : "group or other can write it"
            return "mode 0\(mode): \(who); it must be readable by its owner only (chmod 600)"
        }
        return nil
    }

    /// Creates the file with a new random key (mode 0600, this process's user) if there is
    /// none, then loads it. `created` says which happened. Never replaces an existing file
    /// (`O_EXCL`, no symlink followed): an existing one is checked like any other.
    public static func loadOrCreate(_ path: String) throws(Problem) -> (key: BridgeKey, created: Bool) {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            let error = errno
            guard error == EEXIST else {
                throw Problem(path: path, kind: .unreadable, reason: "cannot create it: \(String(cString: strerror(error)))")
            }
            return (try load(path), false)
        }
        let contents = BridgeKey.generate().fileContents
        var offset = 0
        var failure: Int32?
        while offset < contents.count {
            let count = contents[offset...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else {
                failure = errno
                break
            }
            offset += count
        }
        if failure == nil, fsync(fd) != 0 { failure = errno }
        close(fd)
        if let failure {
            unlink(path)
            throw Problem(path: path, kind: .unreadable, reason: "cannot write it: \(String(cString: strerror(failure)))")
        }
        return (try load(path), true)
    }
}
