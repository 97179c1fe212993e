import NIOConcurrencyHelpers
import CHoldfastShims

#if canImport(Glibc)
import Glibc
#endif

/// The directory a server keeps its sockets in (`holdfast daemon`'s run directory, `holdfast
/// host serve`'s), made safe before anything is bound in it:
///
/// - it and every directory above it belong to root or to this process's user, and no other
///   user can write in it — nor above it, except in a directory with the sticky bit (/tmp),
///   where nobody else can rename or remove what is ours; a symbolic link on the way belongs to
///   root or to us. Otherwise another user could put a socket of their own where ours should
///   be, and a client (root's `holdfast status`) would talk to it;
/// - one instance at a time holds it: an exclusive `flock` on a lock file in it, with the
///   holder's pid written in, so a second instance is refused with that pid;
/// - under that lock, in a directory only we can write, a socket file left at one of our
///   paths is a previous instance's, and is replaced — unless another user owns it or a
///   process listens on it: then it is left alone and start-up stops.
public enum RunDirectory {
    /// Why a directory or a socket path was refused: a sentence an operator can act on.
    public struct Refusal: Error, Sendable, Equatable, CustomStringConvertible {
        public var description: String
        /// A shortage the kernel said (memory, fds, space): not the directory's fault, and a
        /// later start may succeed — the daemon exits 1 for it (restarted by its unit), not 2.
        public var transient: Bool
        public init(_ description: String, transient: Bool = false) {
            self.description = description
            self.transient = transient
        }

        /// What a failed call's errno says of a later try.
        static func isShortage(_ error: Int32) -> Bool {
            [ENOMEM, ENOBUFS, EMFILE, ENFILE, ENOSPC, EAGAIN].contains(error)
        }
    }

    /// Creates `path` (mode 0755) if it is missing, checks it as a server's own directory, and
    /// takes its lock (`lockName` in it). Keep the returned lock for as long as the server runs.
    public static func claim(_ path: String, lockName: String) throws(Refusal) -> RunDirectoryLock {
        guard path.hasPrefix("/") else { throw Refusal("\(path): the run directory must be an absolute path") }
        if mkdir(path, 0o755) != 0, errno != EEXIST {
            let error = errno
            throw Refusal("cannot create the run directory \(path): \(describe(error))", transient: Refusal.isShortage(error))
        }
        try check(path, acceptedOwners: [geteuid()])
        return try RunDirectoryLock(path: path + "/" + lockName)
    }

    /// `claim`, for a live upgrade's new image that was handed the lock's fd across the exec:
    /// the lock never left the daemon (released at the exec, a second daemon, or a purge's
    /// "is one running?" test, could take it while the new image started). The directory is
    /// checked as in `claim`.
    public static func claim(_ path: String, lockName: String, passed fd: Int32) throws(Refusal) -> RunDirectoryLock {
        try check(path, acceptedOwners: [geteuid()])
        return try RunDirectoryLock(path: path + "/" + lockName, adopting: fd)
    }

    /// Checks that only root or this process's user can change what is in `path` (see the type's
    /// description). `acceptedOwners`: who may own `path` itself (a server: itself; a client: root
    /// or itself).
    public static func check(_ path: String, acceptedOwners: Set<uid_t>) throws(Refusal) {
        guard path.hasPrefix("/") else { throw Refusal("\(path): must be an absolute path") }
        let trusted: Set<uid_t> = [0, geteuid()]
        // Symbolic links on the way, as written: only root's or ours (nobody else can then
        // swap them: the directories holding them are checked below).
        var prefix = ""
        for component in path.split(separator: "/") {
            prefix += "/" + component
            var info = stat()
            guard lstat(prefix, &info) == 0 else { throw Refusal("\(prefix): \(describe(errno))") }
            if (info.st_mode & S_IFMT) == S_IFLNK, !trusted.contains(info.st_uid) {
                throw Refusal(
                    "\(prefix) (on the way to \(path)) is a symbolic link owned by \(user(info.st_uid)): "
                        + "its owner could point it elsewhere; use a path without it")
            }
        }
        guard let resolved = realpath(path, nil) else { throw Refusal("\(path): \(describe(errno))") }
        let canonical = String(cString: resolved)
        free(resolved)
        // Every directory from / down to it.
        var directories = ["/"]
        for component in canonical.split(separator: "/") {
            directories.append((directories.last == "/" ? "" : directories.last!) + "/" + component)
        }
        for (index, directory) in directories.enumerated() {
            var info = stat()
            guard lstat(directory, &info) == 0 else { throw Refusal("\(directory): \(describe(errno))") }
            guard (info.st_mode & S_IFMT) == S_IFDIR else { throw Refusal("\(directory): not a directory") }
            let writableByOthers = info.st_mode & (S_IWGRP | S_IWOTH) != 0
            let mode = "0" + String(info.st_mode & 0o7777, radix: 8)
            if index == directories.count - 1 {
                guard acceptedOwners.contains(info.st_uid) else {
                    let expected = acceptedOwners.sorted().map { user($0) }.joined(separator: " or ")
                    throw Refusal(
                        "\(path) is owned by \(user(info.st_uid)), not by \(expected): its owner could replace "
                            + "the sockets in it; remove it or use another directory")
                }
                guard !writableByOthers else {
                    throw Refusal(
                        "\(path) has mode \(mode): group or others can write in it and replace the sockets in it; "
                            + "chmod go-w it or use another directory")
                }
            } else {
                guard trusted.contains(info.st_uid) else {
                    throw Refusal(
                        "\(directory) (above \(path)) is owned by \(user(info.st_uid)): its owner could rename or "
                            + "replace \(path); use a directory under one only root or you own")
                }
                guard !writableByOthers || info.st_mode & S_ISVTX != 0 else {
                    throw Refusal(
                        "\(directory) (above \(path)) has mode \(mode) without the sticky bit: others can rename or "
                            + "replace \(path); use another directory")
                }
            }
        }
    }

    /// Before binding the Unix socket `path` of a server that holds the lock of `runDirectory`:
    /// its directory, when it is not the run directory itself, is checked like the run
    /// directory; a socket file left there by a previous instance (ours: our uid, nobody
    /// listening) is removed; anything else at the path is refused and left alone.
    public static func prepareSocket(_ path: String, runDirectory: String) throws(Refusal) {
        let parent = directory(of: path)
        if canonical(parent) != canonical(runDirectory) {
            try check(parent, acceptedOwners: [geteuid()])
        }
        switch UnixSocketFile.state(path) {
        case .absent: return
        case .stale: unlink(path)
        case .live: throw Refusal("\(path): another process listens on it (not removed); is another instance running?")
        case .foreign(let owner): throw Refusal("\(path): a socket owned by \(user(owner)), not made by us: not removed")
        case .notASocket: throw Refusal("\(path) exists and is not a socket: not removed")
        case .unreadable(let error): throw Refusal("\(path): \(describe(error))")
        case .unknown(let error):
            throw Refusal("\(path): cannot tell whether another process listens on it: \(describe(error))", transient: true)
        }
    }

    /// For a client about to connect to a server's Unix socket: its directory must pass the
    /// check with root or this user as its owner, and the socket file (if any) belong to one of
    /// them. Otherwise the request would go to whoever could put a socket there.
    public static func checkBeforeConnecting(to socket: String) throws(Refusal) {
        let me = geteuid()
        try check(directory(of: socket), acceptedOwners: [0, me])
        var info = stat()
        if lstat(socket, &info) == 0, info.st_uid != 0, info.st_uid != me {
            throw Refusal("\(socket) is owned by \(user(info.st_uid)), not by root or you: not talking to it")
        }
    }

    /// The directory part of a path ("/" for "/x", "." for "x").
    public static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    static func canonical(_ path: String) -> String {
        guard let resolved = realpath(path, nil) else { return path }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// "uid 65534 (nobody)", "uid 0 (root)", "uid 65600".
    static func user(_ uid: uid_t) -> String {
        if let account = UserAccount.lookup(String(uid)) { return "uid \(uid) (\(account.name))" }
        return "uid \(uid)"
    }

    static func describe(_ error: Int32) -> String { "\(String(cString: strerror(error))) (errno \(error))" }
}

/// A run directory's lock: an exclusive `flock` on a file in it, held while this object lives
/// (the fd is close-on-exec, so no child keeps it). The holder's pid is written in the file.
public final class RunDirectoryLock: Sendable {
    public let path: String
    /// The locked file's fd (kept open across a live upgrade's exec).
    public let descriptor: Int32

    /// Takes over the lock held through `fd` (the same open file: its `flock` is held already,
    /// and taking it again through it succeeds). Throws if `fd` is not that file, or not locked
    /// through it.
    init(path: String, adopting fd: Int32) throws(RunDirectory.Refusal) {
        var passed = stat()
        var named = stat()
        guard fstat(fd, &passed) == 0, lstat(path, &named) == 0, passed.st_dev == named.st_dev, passed.st_ino == named.st_ino,
            (passed.st_mode & S_IFMT) == S_IFREG, passed.st_uid == geteuid()
        else {
            throw RunDirectory.Refusal("fd \(fd), passed as the lock, is not \(path)")
        }
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let error = errno
            if error == EINTR { continue }
            throw RunDirectory.Refusal("flock(\(path)) through the passed fd \(fd): \(RunDirectory.describe(error))")
        }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        self.path = path
        self.descriptor = fd
    }

    /// Takes the lock or throws: "already running" with the holder's pid when another holds it.
    init(path: String) throws(RunDirectory.Refusal) {
        let fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            let error = errno
            throw RunDirectory.Refusal(
                "cannot open the lock file \(path): \(RunDirectory.describe(error))", transient: RunDirectory.Refusal.isShortage(error))
        }
        var info = stat()
        guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG, info.st_uid == geteuid() else {
            close(fd)
            throw RunDirectory.Refusal("\(path) is not a regular file of ours: not using it as the lock")
        }
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let error = errno
            if error == EINTR { continue }
            let holder = Self.readPID(fd)
            close(fd)
            if error == EWOULDBLOCK {
                let directory = RunDirectory.directory(of: path)
                throw RunDirectory.Refusal(
                    "already running on \(directory), pid \(holder.map(String.init) ?? "unknown") (it holds \(path))")
            }
            throw RunDirectory.Refusal("flock(\(path)): \(RunDirectory.describe(error))")
        }
        let text = Array("\(getpid())\n".utf8)
        _ = ftruncate(fd, 0)
        _ = text.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        self.path = path
        self.descriptor = fd
    }

    private let closesAtEnd = NIOLockedValueBox(true)

    /// The fd stays open when this object goes (a live upgrade's new image that falls back:
    /// the previous image takes the lock over through it).
    public func leaveOpen() { closesAtEnd.withLockedValue { $0 = false } }

    deinit { if closesAtEnd.withLockedValue({ $0 }) { close(descriptor) } }

    /// The pid the file holds (the lock's holder), read without moving anyone's offset.
    private static func readPID(_ fd: Int32) -> pid_t? {
        var buffer = [UInt8](repeating: 0, count: 32)
        let count = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        guard count > 0 else { return nil }
        return pid_t(String(decoding: buffer[..<count], as: UTF8.self).split(separator: "\n").first ?? "")
    }
}

/// What is at a Unix socket's path.
public enum UnixSocketFile: Equatable, Sendable {
    case absent
    /// A socket file of our uid that nobody listens on (a previous instance's, or a closed one).
    case stale
    /// A process accepts connections on it (or it is a socket of another type in use).
    case live
    /// A socket another user owns.
    case foreign(owner: uid_t)
    case notASocket
    case unreadable(errno: Int32)
    /// Whether a process listens on it could not be told (no socket to try it with: memory or
    /// fds short). Taken for `live`, a start during a shortage was refused for good (exit 2,
    /// which the unit does not restart), saying another instance ran.
    case unknown(errno: Int32)

    public static func state(_ path: String) -> UnixSocketFile {
        var info = stat()
        guard lstat(path, &info) == 0 else { return errno == ENOENT ? .absent : .unreadable(errno: errno) }
        guard (info.st_mode & S_IFMT) == S_IFSOCK else { return .notASocket }
        guard info.st_uid == geteuid() else { return .foreign(owner: info.st_uid) }
        switch probe(path) {
        case .listening: return .live
        case .notListening: return .stale
        case .unknown(let error): return .unknown(errno: error)
        }
    }

    private enum Probe { case listening, notListening, unknown(Int32) }

    /// A non-blocking connect: refused (or the file gone) means nobody listens; a shortage of
    /// memory or fds (for the probe's socket, or the connect) says nothing. Anything else —
    /// accepted, a full backlog, a socket of another type — means the path is in use.
    private static func probe(_ path: String) -> Probe {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .unknown(errno) }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return .listening }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in bytes.enumerated() { raw[index] = byte }
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + 1)
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, length) }
        }
        if result == 0 { return .listening }
        let error = errno
        if error == ECONNREFUSED || error == ENOENT { return .notListening }
        if [ENOMEM, ENOBUFS, EMFILE, ENFILE].contains(error) { return .unknown(error) }
        return .listening
    }
}
