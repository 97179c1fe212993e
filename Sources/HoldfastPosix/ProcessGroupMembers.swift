#if canImport(Glibc)
import Glibc
#endif

/// The processes of a process group that descend from one ancestor, found in /proc: a group
/// signalled by number (`kill(-pgid)`) after its leader was reaped may no longer be the group
/// meant — every member gone, the kernel gave the number to a new process that leads a group
/// of its own (any `setsid` child on the machine) — while the group's own members, orphans
/// included, all descend from the supervisor (their subreaper). Signalled one by one, only
/// those are reached.
public enum ProcessGroupMembers {
    /// The pids whose process group is `group` and whose chain of parents reaches `ancestor`.
    public static func of(group: pid_t, descendingFrom ancestor: pid_t) -> [pid_t] {
        var parents: [pid_t: pid_t] = [:]
        var members: [pid_t] = []
        for name in DirectoryListing.names("/proc") ?? [] {
            guard let pid = pid_t(name), let (parent, processGroup) = parentAndGroup(of: pid) else { continue }
            parents[pid] = parent
            if processGroup == group { members.append(pid) }
        }
        return members.filter { member in
            var current = member
            // Bounded: a chain is never longer than the processes seen (a cycle cannot be, but
            // a table read while processes come and go is not a snapshot).
            for _ in 0...parents.count {
                guard let parent = parents[current], parent > 0 else { return false }
                if parent == ancestor { return true }
                current = parent
            }
            return false
        }
    }

    /// A process's parent and process group, from /proc/PID/stat (the fields after the
    /// command's closing parenthesis: state, ppid, pgrp).
    static func parentAndGroup(of pid: pid_t) -> (parent: pid_t, group: pid_t)? {
        guard let line = readSmallFile("/proc/\(pid)/stat"), let close = line.lastIndex(of: ")") else { return nil }
        let fields = line[line.index(after: close)...].split(separator: " ")
        guard fields.count > 3, let parent = pid_t(fields[1]), let group = pid_t(fields[2]) else { return nil }
        return (parent, group)
    }
}
