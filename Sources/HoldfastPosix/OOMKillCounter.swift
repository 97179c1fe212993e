import HoldfastCore

#if canImport(Glibc)
import Glibc
#endif

/// A process's memory cgroup's count of OOM kills (`CgroupLocation.oomKillCounterFiles`), and
/// what it read when the process started: its exit report says how many processes the kernel's
/// OOM killer killed there while it ran (`ExitReport.oomKills`).
///
/// Located for a runc container's processes, which share the memory cgroup runc made: the
/// kernel counts there every kill of one of them, whether the container's memory limit or the
/// guest's own shortage set the OOM killer off. A direct process has no memory cgroup of its
/// own (its cgroup has no controller: `ProcessCgroups`), so a count there would mix it with the
/// daemon's own processes: none is located for it.
public struct OOMKillCounter: Codable, Sendable, Equatable {
    /// The file holding the count: `memory.events` (cgroup v2) or `memory.oom_control` (v1).
    public var file: String
    /// Its count when the process started.
    public var atStart: UInt64

    public init(file: String, atStart: UInt64) {
        self.file = file
        self.atStart = atStart
    }

    /// The counter of the memory cgroup `pid` is in now, nil when it has none the kernel counts
    /// OOM kills in (no memory controller on it, a kernel before 4.13) or `pid` is gone.
    public static func locate(pid: pid_t) -> OOMKillCounter? {
        guard let procCgroup = readSmallFile("/proc/\(pid)/cgroup"), let mountinfo = readSmallFile("/proc/self/mountinfo") else { return nil }
        return CgroupLocation.oomKillCounterFiles(mountinfo: mountinfo, procCgroup: procCgroup).lazy.compactMap(reading).first
    }

    /// The counter in `file` as it reads now: a container's, for an exec about to start in it.
    public static func reading(_ file: String) -> OOMKillCounter? {
        guard let text = readSmallFile(file), let count = CgroupLocation.oomKills(in: text) else { return nil }
        return OOMKillCounter(file: file, atStart: count)
    }

    /// OOM kills in the cgroup since the process started; nil once the cgroup is gone (runc
    /// deleted the container) or the file cannot be read.
    public func killsSinceStart() -> UInt64? {
        guard let text = readSmallFile(file), let count = CgroupLocation.oomKills(in: text) else { return nil }
        return count >= atStart ? count - atStart : count
    }
}
