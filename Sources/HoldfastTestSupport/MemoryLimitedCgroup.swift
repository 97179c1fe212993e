#if canImport(Glibc)
import Glibc
#endif

/// A memory cgroup held to a limit with no swap (cgroup v2 under the root, where the memory
/// controller is on for its children, or a v1 memory hierarchy), made for the OOM kill tests
/// and the soak's `out-of-memory` processes: a process that writes its pid to `procs` grows
/// there until the kernel's OOM killer ends it.
public struct MemoryLimitedCgroup: Sendable {
    public let path: String
    public var procs: String { path + "/cgroup.procs" }

    /// Whether one can be made here: root, and a memory hierarchy to make it in.
    public static var available: Bool {
        geteuid() == 0 && (v2HasMemory || access("/sys/fs/cgroup/memory/memory.limit_in_bytes", W_OK) == 0)
    }

    private static var v2HasMemory: Bool {
        (readText("/sys/fs/cgroup/cgroup.subtree_control") ?? "").split(whereSeparator: { $0 == " " || $0 == "\n" }).contains("memory")
    }

    /// Makes `name` with `limit` bytes; nil where there is no memory hierarchy to make it in.
    public static func make(name: String, limit: Int) -> MemoryLimitedCgroup? {
        if v2HasMemory {
            let path = "/sys/fs/cgroup/" + name
            guard mkdir(path, 0o755) == 0 || errno == EEXIST, writeText(path + "/memory.max", "\(limit)") else { return nil }
            _ = writeText(path + "/memory.swap.max", "0")
            return MemoryLimitedCgroup(path: path)
        }
        guard access("/sys/fs/cgroup/memory/memory.limit_in_bytes", W_OK) == 0 else { return nil }
        let path = "/sys/fs/cgroup/memory/" + name
        guard mkdir(path, 0o755) == 0 || errno == EEXIST, writeText(path + "/memory.limit_in_bytes", "\(limit)") else { return nil }
        _ = writeText(path + "/memory.memsw.limit_in_bytes", "\(limit)")
        return MemoryLimitedCgroup(path: path)
    }

    /// Removed once empty (its processes ended and reaped), waiting up to 2 s for that.
    public func remove() {
        for _ in 0..<100 {
            if rmdir(path) == 0 || errno == ENOENT { return }
            usleep(20_000)
        }
    }

    private static func readText(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let count = read(fd, &buffer, buffer.count)
        return count >= 0 ? String(decoding: buffer[..<count], as: UTF8.self) : nil
    }

    private static func writeText(_ path: String, _ text: String) -> Bool {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        return write(fd, bytes, bytes.count) == bytes.count
    }
}
