import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// Figures of the calling process, from /proc/self.
public enum ProcessFigures {
    /// Open fds now; -1 if /proc cannot be read.
    public static func openDescriptors() -> Int {
        guard let directory = opendir("/proc/self/fd") else { return -1 }
        defer { closedir(directory) }
        var count = -3  // ".", ".." and the directory stream itself
        while readdir(directory) != nil { count += 1 }
        return count
    }

    public static func residentKiB() -> Int {
        let fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return -1 }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 128)
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return -1 }
        let fields = String(decoding: buffer[..<count], as: UTF8.self).split(separator: " ")
        guard fields.count > 1, let pages = Int(fields[1]) else { return -1 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE))) / 1024
    }
}

extension ProcessFigures {
    /// Refuses (`tooManyOpenFiles`) what would leave fewer than `reserve` fds below this
    /// process's soft limit once `needed` more are open: a role near its limit keeps room for
    /// what must not fail (a broker restart taking every process over, a redial), and says so
    /// instead of failing later inside a syscall.
    public static func ensureDescriptorRoom(needed: Int, reserve: Int, holder: String, keptFor purpose: String) throws(HoldfastError) {
        let open = openDescriptors()
        // /proc/self/fd could not even be opened for want of an fd: that is no room.
        if open < 0, errno == EMFILE || errno == ENFILE {
            throw HoldfastError(.tooManyOpenFiles, "\(holder) has no fd left (its limit reached); raise the daemon's hard limit (LimitNOFILE=) or end some processes")
        }
        let limit = ResourceLimits.openFileLimit.soft
        guard open >= 0, UInt64(open + needed + reserve) > limit else { return }
        throw HoldfastError(
            .tooManyOpenFiles,
            "\(holder) holds \(open) fds of its limit of \(limit) and keeps \(reserve) \(purpose); raise the daemon's hard "
                + "limit (LimitNOFILE= in its unit: README, \"Open files\") or end some processes")
    }
}

extension ProcessFigures {
    /// Another process's open fds and soft limit on them (/proc/PID/fd and /proc/PID/limits),
    /// nil when either cannot be read.
    public static func descriptors(of pid: pid_t) -> (open: Int, limit: UInt64)? {
        guard let directory = opendir("/proc/\(pid)/fd") else { return nil }
        var count = -2  // "." and ".."
        while readdir(directory) != nil { count += 1 }
        closedir(directory)
        let fd = open("/proc/\(pid)/limits", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let read = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        close(fd)
        guard read > 0 else { return nil }
        let text = String(decoding: buffer[..<read], as: UTF8.self)
        guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("Max open files") })
        else { return nil }
        // "Max open files            1024                 524288               files"
        let fields = line.dropFirst("Max open files".count).split(whereSeparator: \.isWhitespace)
        guard let soft = fields.first.flatMap({ UInt64($0) }) else { return nil }
        return (count, soft)
    }
}
