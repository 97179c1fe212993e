#if canImport(Glibc)
import Glibc
#endif

/// A local user, resolved from the password database.
public struct UserAccount: Sendable, Equatable {
    public var name: String
    public var uid: uid_t
    public var gid: gid_t

    /// Looks a user up by name, or by number (`"65534"`).
    public static func lookup(_ nameOrID: String) -> UserAccount? {
        var entry = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 16384)
        let status: Int32
        if let id = uid_t(nameOrID) {
            status = getpwuid_r(id, &entry, &buffer, buffer.count, &result)
        } else {
            status = getpwnam_r(nameOrID, &entry, &buffer, buffer.count, &result)
        }
        guard status == 0, result != nil else { return nil }
        return UserAccount(name: String(cString: entry.pw_name), uid: entry.pw_uid, gid: entry.pw_gid)
    }
}

public enum Privileges {
    /// Drops to `user` for good: supplementary groups to just its group, then gid, then uid (in
    /// that order: after setuid the others are no longer allowed). Verifies that root cannot be
    /// regained.
    public static func drop(to user: UserAccount) throws(SystemError) {
        var groups = [user.gid]
        guard setgroups(1, &groups) == 0 else { throw .last("setgroups(\(user.gid))") }
        // As root, setgid/setuid set the real, effective and saved ids alike.
        guard setgid(user.gid) == 0 else { throw .last("setgid(\(user.gid))") }
        guard setuid(user.uid) == 0 else { throw .last("setuid(\(user.uid))") }
        if user.uid != 0, setuid(0) == 0 {
            throw SystemError("setuid(0) succeeded after dropping to \(user.name)", errno: .notPermitted)
        }
    }

    public static var isRoot: Bool { geteuid() == 0 }
}

public enum ResourceLimits {
    /// Raises this process's soft limit on open files to its hard limit and returns both limits
    /// after the change (the soft one unchanged if raising failed). A service manager's default
    /// soft limit (1,024 under systemd) is meant for select()-era programs; a process that holds
    /// thousands of fds raises its own soft limit, so its children keep the low one.
    @discardableResult
    public static func raiseOpenFileLimit() -> (soft: UInt64, hard: UInt64) {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return (0, 0) }
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { limit = raised }
        }
        return (UInt64(limit.rlim_cur), UInt64(limit.rlim_max))
    }
}
