/// Where the kernel counts a cgroup's OOM kills, and how to read the count. Pure: the callers
/// read `/proc/PID/cgroup`, `/proc/self/mountinfo` and the counter file.
///
/// A runc container's processes share the memory cgroup runc made for it, where the kernel counts
/// every process its OOM killer killed there (`oom_kill`): in `memory.events` on cgroup v2, in
/// `memory.oom_control` on a v1 memory hierarchy (Linux 4.13 and later). A process killed by
/// SIGKILL is told from one killed by the OOM killer only by that count.
extension CgroupLocation {
    /// The files that may hold a process's OOM kill count, most specific first: its cgroup v2
    /// directory's `memory.events` (there only when the memory controller is enabled for it),
    /// then its v1 memory cgroup's `memory.oom_control`. The caller reads the first that exists.
    public static func oomKillCounterFiles(mountinfo: String, procCgroup: String) -> [String] {
        var files: [String] = []
        if let directory = directory(mountinfo: mountinfo, procCgroup: procCgroup) {
            files.append(join(directory, "memory.events"))
        }
        if let path = v1Path(procCgroup: procCgroup, controller: "memory") {
            for mount in v1Mounts(mountinfo: mountinfo, controller: "memory") {
                let root = mount.root == "/" ? "" : mount.root
                guard root.isEmpty || path == root || path.hasPrefix(root + "/") else { continue }
                files.append(join(join(mount.mountPoint, String(path.dropFirst(root.count))), "memory.oom_control"))
                break
            }
        }
        return files
    }

    /// The `oom_kill N` line's count in a `memory.events` or `memory.oom_control` text; nil
    /// without one (a kernel before 4.13 has no such line in `memory.oom_control`).
    public static func oomKills(in counterText: String) -> UInt64? {
        for line in counterText.split(separator: "\n") {
            let fields = line.split(separator: " ")
            if fields.count == 2, fields[0] == "oom_kill" { return UInt64(fields[1]) }
        }
        return nil
    }

    /// The cgroup v1 mounts of `controller` ("- cgroup cgroup rw,memory"), in mountinfo's order.
    public static func v1Mounts(mountinfo: String, controller: String) -> [Mount] {
        mounts(mountinfo: mountinfo) { type, options in
            type == "cgroup" && (options?.split(separator: ",").contains { $0 == controller } ?? false)
        }
    }

    /// The path of `controller`'s v1 hierarchy in a `/proc/PID/cgroup` text ("4:memory:/x", or
    /// "3:cpu,cpuacct:/x" for a co-mounted one); nil without such a line.
    public static func v1Path(procCgroup: String, controller: String) -> String? {
        for line in procCgroup.split(separator: "\n") {
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard fields.count == 3, fields[1].split(separator: ",").contains(where: { $0 == controller }) else { continue }
            return fields[2].hasPrefix("/") ? String(fields[2]) : nil
        }
        return nil
    }
}
