import CHoldfastShims
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// A local user, resolved from the password database.
public struct UserAccount: Sendable, Equatable {
    public var name: String
    public var uid: uid_t
    public var gid: gid_t
    /// The home directory the password database gives; nil for a bare `uid:N`.
    public var home: String? = nil

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
        return UserAccount(name: String(cString: entry.pw_name), uid: entry.pw_uid, gid: entry.pw_gid, home: String(cString: entry.pw_dir))
    }

    /// A process spec's `user`: a name or a number from the password database, or else a bare
    /// number (1 to 4294967294) that has no entry there — what a minimal guest image's
    /// containers often run as (podman and runc take any uid too): uid and gid that number, no
    /// home. nil for an unknown name or a malformed number.
    public static func forProcess(_ nameOrUID: String) -> UserAccount? {
        if let known = lookup(nameOrUID) { return known }
        guard !nameOrUID.isEmpty, nameOrUID.allSatisfy({ $0.isASCII && $0.isNumber }), let uid = UInt32(nameOrUID), uid > 0, uid < UInt32.max
        else { return nil }
        return UserAccount(name: nameOrUID, uid: uid, gid: uid)
    }

    /// The prefix of a bare numeric identity: `uid:65600` is uid 65600 and gid 65600, with no
    /// entry in the password database needed (a uid from a reserved range, for the broker).
    public static let numericPrefix = "uid:"

    /// `broker.user`: a user name from the password database, or `uid:N` (1 to 4294967294).
    /// nil when the name is unknown or the number malformed.
    public static func resolve(_ nameOrUID: String) -> UserAccount? {
        guard nameOrUID.hasPrefix(numericPrefix) else { return lookup(nameOrUID) }
        let digits = nameOrUID.dropFirst(numericPrefix.count)
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let uid = UInt32(digits), uid > 0, uid < UInt32.max
        else { return nil }
        return UserAccount(name: nameOrUID, uid: uid, gid: uid)
    }
}

/// The uids Holdfast picks from when it needs one no other process has (a development or test
/// broker): 65,600 to 99,999. systemd's users and groups document leaves 65,536–524,287
/// unused, and Debian's adduser never allocates above 65,535, so no account is made there; and
/// below 100,000, where useradd's subordinate ranges begin (SUB_UID_MIN: a uid in a user's
/// range is that user's to take in a user namespace). The daemon still checks that no process
/// runs as the uid, and that no subordinate range holds it, before its broker takes it.
public enum ReservedUIDs {
    public static let range: ClosedRange<uid_t> = 65_600...99_999
    /// `config/holdfast-dev.yaml`'s broker: the first of the range.
    public static let development: uid_t = 65_600

    /// A uid from the range that has no password entry and that no process uses now, for a
    /// daemon under test: tried from a point derived from this process's pid and a counter, so
    /// daemons started at once (parallel tests, other test processes) get different ones.
    public static func unused() -> uid_t {
        let span = UInt32(range.count - 1)  // the first is the development config's
        let subordinate = SubordinateIDs.systemUIDRanges()
        let start = (UInt32(truncatingIfNeeded: getpid()) &* 97 &+ nextOffset()) % span
        for step in 0..<span {
            let candidate = range.lowerBound + 1 + (start + step) % span
            if UserAccount.lookup(String(candidate)) == nil, ProcessScan.processes(withUID: candidate).isEmpty,
                SubordinateIDs.range(holding: candidate, in: subordinate) == nil
            {
                return candidate
            }
        }
        return range.lowerBound + 1 + start
    }

    private static let counter = NIOLockedValueBox<UInt32>(0)

    private static func nextOffset() -> UInt32 {
        counter.withLockedValue { value in
            value &+= 1
            return value &* 16
        }
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

    /// PR_SET_DUMPABLE 0: no core dump, /proc/PID/* owned by root, and no ptrace,
    /// `pidfd_getfd` or /proc/PID/mem from a process of the same uid without CAP_SYS_PTRACE.
    /// A change of credentials (setuid) resets it to fs.suid_dumpable, so set it after one too.
    public static func makeNonDumpable() throws(SystemError) {
        guard hf_set_dumpable(0) == 0 else { throw .last("prctl(PR_SET_DUMPABLE, 0)") }
    }

    /// Whether this process is dumpable (PR_GET_DUMPABLE).
    public static var isDumpable: Bool { hf_get_dumpable() != 0 }
}

/// Processes by uid, from /proc.
public enum ProcessScan {
    /// Every process (thread group) that has `uid` as its real, effective, saved or filesystem
    /// uid, from the `Uid:` line of /proc/PID/status. A process that exits meanwhile is skipped,
    /// and so is a zombie (it can no longer do anything; its parent has yet to reap it).
    public static func processes(withUID uid: uid_t) -> [pid_t] {
        (DirectoryListing.names("/proc") ?? []).compactMap { name -> pid_t? in
            guard let pid = pid_t(name), let status = status(of: pid), !status.isZombie, status.uids.contains(uid) else { return nil }
            return pid
        }.sorted()
    }

    /// The real, effective, saved and filesystem uids of `pid`.
    public static func uids(of pid: pid_t) -> [uid_t]? { status(of: pid)?.uids }

    /// The `Uid:` and `State:` lines of /proc/PID/status.
    private static func status(of pid: pid_t) -> (uids: [uid_t], isZombie: Bool)? {
        guard let text = readSmallFile("/proc/\(pid)/status") else { return nil }
        var uids: [uid_t]?
        var zombie = false
        for line in text.split(separator: "\n") {
            if line.hasPrefix("Uid:") {
                uids = line.dropFirst("Uid:".count).split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { uid_t($0) }
            } else if line.hasPrefix("State:") {
                let state = line.dropFirst("State:".count).drop { $0 == " " || $0 == "\t" }.first
                zombie = state == "Z" || state == "X"
            }
        }
        return uids.map { ($0, zombie) }
    }

    /// Whether `pid` is in this process's pid namespace (its /proc/PID/ns/pid is ours); nil
    /// when either cannot be looked at (the process gone). Every process this one can see is
    /// in its namespace or in one below it, whose processes cannot see this one's.
    public static func sharesOurPIDNamespace(_ pid: pid_t) -> Bool? {
        PIDNamespace.isOurs("/proc/\(pid)/ns/pid")
    }

    /// A process's command name (/proc/PID/comm), for messages.
    public static func commandName(of pid: pid_t) -> String? {
        readSmallFile("/proc/\(pid)/comm").flatMap { $0.split(separator: "\n").first.map(String.init) }
    }

    /// The first `count` arguments `pid` was started with (/proc/PID/cmdline); nil if it is gone.
    public static func arguments(of pid: pid_t, first count: Int) -> [String]? {
        guard let text = readSmallFile("/proc/\(pid)/cmdline") else { return nil }
        return Array(text.split(separator: "\0", omittingEmptySubsequences: false).prefix(count).map(String.init))
    }

}

public enum ResourceLimits {
    /// Raises this process's soft limit on open files to its hard limit and returns both limits
    /// after the change (the soft one unchanged if raising failed). A service manager's default
    /// soft limit (1,024 under systemd) is meant for select()-era programs; a process that holds
    /// thousands of fds raises its own soft limit, and every child `Spawner` starts from then on
    /// gets the soft limit back: `childrenKeep`, or the one this process had before (a live
    /// upgrade's new image passes what the first one found, as its own is raised already).
    @discardableResult
    public static func raiseOpenFileLimit(childrenKeep original: UInt64? = nil) -> (soft: UInt64, hard: UInt64) {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return (0, 0) }
        let before = UInt64(limit.rlim_cur)
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { limit = raised }
        }
        childSoftLimit.withLockedValue { $0 = original ?? before }
        return (UInt64(limit.rlim_cur), UInt64(limit.rlim_max))
    }

    /// The soft limit on open files children get (`raiseOpenFileLimit`); nil: they inherit ours.
    public static var childOpenFileSoftLimit: UInt64? { childSoftLimit.withLockedValue { $0 } }
    private static let childSoftLimit = NIOLockedValueBox<UInt64?>(nil)

    /// This process's limits on open files now (soft, hard).
    public static var openFileLimit: (soft: UInt64, hard: UInt64) {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return (0, 0) }
        return (UInt64(limit.rlim_cur), UInt64(limit.rlim_max))
    }
}

/// The OOM killer's adjustment of this process's badness (/proc/self/oom_score_adj, -1000 to
/// 1000; -1000: never chosen). The supervisor protects itself, since its death ends every
/// container, and every process it starts gets the adjustment it had found back — children
/// inherit the value, and a container must stay the OOM killer's choice before Holdfast.
public enum OOMScore {
    /// The supervisor: its death ends every container.
    public static let supervisor: Int32 = -1000
    /// The broker and the bridge worker: each survives its own death (restarted, nothing lost),
    /// so they are spared before a container, not at any price.
    public static let role: Int32 = -500

    /// This process's adjustment now; nil if /proc cannot say.
    public static var current: Int32? {
        ProcessRunState.firstLine(of: "/proc/self/oom_score_adj").flatMap { Int32($0.filter { $0 != " " }) }
    }

    /// Sets this process's adjustment to `value` and records what children get back:
    /// `childrenKeep`, or the adjustment this process had (a live upgrade's new image passes
    /// what the first one found). Throws if the kernel refuses (no CAP_SYS_RESOURCE).
    public static func protect(_ value: Int32, childrenKeep original: Int32? = nil) throws(SystemError) {
        let before = current ?? 0
        childValue.withLockedValue { $0 = original ?? before }
        let fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .last("open(/proc/self/oom_score_adj)") }
        defer { close(fd) }
        let text = Array(String(value).utf8)
        guard write(fd, text, text.count) == text.count else { throw .last("write(/proc/self/oom_score_adj, \(value))") }
    }

    /// The adjustment children get (`protect`); nil: they inherit ours.
    public static var childAdjustment: Int32? { childValue.withLockedValue { $0 } }
    private static let childValue = NIOLockedValueBox<Int32?>(nil)
}

/// Pid namespaces, told apart by the identity (device and inode) of their /proc/PID/ns/pid.
public enum PIDNamespace {
    /// Whether the namespace at `path` (a /proc/PID/ns/pid, or a bind mount of one) is this
    /// process's; nil when either cannot be looked at.
    public static func isOurs(_ path: String) -> Bool? {
        var theirs = stat()
        var ours = stat()
        guard stat(path, &theirs) == 0, stat("/proc/self/ns/pid", &ours) == 0 else { return nil }
        return theirs.st_dev == ours.st_dev && theirs.st_ino == ours.st_ino
    }
}

/// The scheduling every child is given (nice value, policy, I/O priority): what the daemon
/// started with, read before `main` (shims.c), never what an operator set on the daemon later
/// (`renice`/`chrt` of its pid change the thread it forks from). A live upgrade carries it to
/// the next image, whose own start values are those of the thread that exec'd it.
public struct StartScheduling: Codable, Sendable, Equatable {
    public var nice: Int32
    public var policy: Int32
    public var priority: Int32
    public var ioPriority: Int

    /// This process's.
    public static var current: StartScheduling {
        var nice: Int32 = 0
        var policy: Int32 = 0
        var priority: Int32 = 0
        var ioPriority = 0
        hf_start_scheduling(&nice, &policy, &priority, &ioPriority)
        return StartScheduling(nice: nice, policy: policy, priority: priority, ioPriority: ioPriority)
    }

    /// Makes these the values children are given.
    public func adopt() {
        hf_set_start_scheduling(nice, policy, priority, ioPriority)
    }
}
