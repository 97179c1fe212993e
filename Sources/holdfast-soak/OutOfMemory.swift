#if canImport(Glibc)
import Glibc
#endif

/// The memory cgroup the soak's `out-of-memory` processes move themselves into (cgroup v2 under
/// the root, where the memory controller is on for its children, or a v1 memory hierarchy),
/// held to `limit` bytes with no swap: there each one grows until the kernel's OOM killer ends
/// it, and its exit must say so (`ExitReport.oomKilled`), under every fault of the soak.
struct OutOfMemoryCgroup: Sendable {
    let path: String
    var procs: String { path + "/cgroup.procs" }
    static let limit = 48 << 20

    /// Nil where there is no memory cgroup to make, or the daemon could not read the kernel's
    /// log (without it no exit can say it was the OOM killer's).
    static func make(pid: pid_t) -> OutOfMemoryCgroup? {
        guard access("/dev/kmsg", R_OK) == 0 else { return nil }
        let name = "holdfast-soak-oom-\(pid)"
        let subtree = readText("/sys/fs/cgroup/cgroup.subtree_control") ?? ""
        if subtree.split(whereSeparator: { $0 == " " || $0 == "\n" }).contains("memory") {
            let path = "/sys/fs/cgroup/" + name
            guard mkdir(path, 0o755) == 0 || errno == EEXIST, writeText(path + "/memory.max", "\(limit)") else { return nil }
            _ = writeText(path + "/memory.swap.max", "0")
            return OutOfMemoryCgroup(path: path)
        }
        guard access("/sys/fs/cgroup/memory/memory.limit_in_bytes", W_OK) == 0 else { return nil }
        let path = "/sys/fs/cgroup/memory/" + name
        guard mkdir(path, 0o755) == 0 || errno == EEXIST, writeText(path + "/memory.limit_in_bytes", "\(limit)") else { return nil }
        _ = writeText(path + "/memory.memsw.limit_in_bytes", "\(limit)")
        return OutOfMemoryCgroup(path: path)
    }

    /// Removed once empty (the soak's processes all ended by then).
    func remove() {
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
