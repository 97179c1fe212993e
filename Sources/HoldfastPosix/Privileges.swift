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
