#if canImport(Glibc)
import Glibc
#endif

/// Whole-file reads and writes for small files (configuration, pid files, runc's logs, test
/// fixtures): blocking, EINTR-safe, close-on-exec.
public enum WholeFile {
    /// The file's bytes, or nil if it cannot be opened or read.
    public static func read(_ path: String) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var result: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                return nil
            }
            if count == 0 { return result }
            result += buffer[..<count]
        }
    }

    /// Creates or truncates `path` and writes every byte.
    public static func write(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o644) throws(SystemError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
        guard fd >= 0 else { throw .last("open(\(path))") }
        defer { close(fd) }
        var offset = 0
        while offset < bytes.count {
            let count = bytes[offset...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { throw .last("write(\(path))") }
            offset += count
        }
    }
}

/// A directory's entries.
public enum DirectoryListing {
    /// The names in `path` but `.` and `..`, or nil if it cannot be opened.
    public static func names(_ path: String) -> [String]? {
        guard let directory = opendir(path) else { return nil }
        defer { closedir(directory) }
        var names: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }
}

/// Directory trees.
public enum FileTree {
    /// Removes `path` and everything under it, without following symlinks and without an `rm`
    /// child. Best effort: what cannot be removed stays.
    public static func remove(_ path: String) {
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        guard (info.st_mode & S_IFMT) == S_IFDIR else {
            unlink(path)
            return
        }
        for name in DirectoryListing.names(path) ?? [] { remove(path + "/" + name) }
        rmdir(path)
    }
}

/// A small text file (a /proc status file), or nil if it cannot be read.
func readSmallFile(_ path: String) -> String? {
    WholeFile.read(path).map { String(decoding: $0, as: UTF8.self) }
}
