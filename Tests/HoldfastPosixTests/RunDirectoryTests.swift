import HoldfastPosix
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The run directory's rules, one by one: who may own it and what is above it, the lock, and
/// which socket files may be replaced. (Daemon-level tests: BrokerLockdownTests.)
@Suite("Run directories: ours alone, locked, and only our own stale sockets replaced", .timeLimit(.minutes(5)))
struct RunDirectoryTests {
    static let isRoot = geteuid() == 0
    static let nobody: uid_t = 65534

    /// The inode and owner of a path, to show a file was left alone.
    static func identity(_ path: String) -> (inode: ino_t, owner: uid_t)? {
        var info = stat()
        guard lstat(path, &info) == 0 else { return nil }
        return (info.st_ino, info.st_uid)
    }

    @Test func aMissingDirectoryIsCreatedCheckedAndLockedWithOurPID() throws {
        let base = try TemporaryDirectory()
        defer { base.remove() }
        let run = base.file("run")
        let lock = try RunDirectory.claim(run, lockName: "holdfast.lock")
        var info = stat()
        #expect(stat(run, &info) == 0 && info.st_mode & 0o777 == 0o755 && info.st_uid == geteuid())
        #expect(readFile(run + "/holdfast.lock") == Array("\(getpid())\n".utf8))
        withExtendedLifetime(lock) {}
    }

    @Test(.enabled(if: Self.isRoot, "needs root: the hostile directory belongs to another user"))
    func aDirectoryAnotherUserOwnsIsRefusedAndItsSocketLeftAlone() throws {
        let base = try TemporaryDirectory()
        defer { base.remove() }
        let run = base.file("run")
        mkdir(run, 0o777)
        chmod(run, 0o777)
        chown(run, Self.nobody, Self.nobody)
        makeStaleSocket(run + "/control.sock")
        chown(run + "/control.sock", Self.nobody, Self.nobody)
        let before = Self.identity(run + "/control.sock")
        let error = #expect(throws: RunDirectory.Refusal.self) { try RunDirectory.claim(run, lockName: "holdfast.lock") }
        #expect(error?.description.contains("owned by uid 65534") == true, "\(error?.description ?? "")")
        #expect(access(run + "/holdfast.lock", F_OK) != 0, "nothing was created in it")
        let after = Self.identity(run + "/control.sock")
        #expect(after?.inode == before?.inode && after?.owner == Self.nobody, "the other user's socket is still there")
        // A client refuses to talk to a socket there too.
        #expect(throws: RunDirectory.Refusal.self) { try RunDirectory.checkBeforeConnecting(to: run + "/control.sock") }
    }

    @Test(arguments: [0o777, 0o775, 0o757, 0o1777] as [mode_t])
    func aDirectoryOthersCanWriteIsRefused(mode: mode_t) throws {
        let base = try TemporaryDirectory()
        defer { base.remove() }
        let run = base.file("run")
        mkdir(run, 0o755)
        chmod(run, mode)
        let error = #expect(throws: RunDirectory.Refusal.self) { try RunDirectory.claim(run, lockName: "holdfast.lock") }
        #expect(error?.description.contains("mode 0\(String(mode, radix: 8))") == true, "\(error?.description ?? "")")
    }

    @Test func aDirectoryAboveThatOthersCanWriteIsRefusedUnlessSticky() throws {
        let base = try TemporaryDirectory()
        defer { base.remove() }
        let above = base.file("shared")
        mkdir(above, 0o777)
        chmod(above, 0o777)
        let run = above + "/run"
        let error = #expect(throws: RunDirectory.Refusal.self) { try RunDirectory.claim(run, lockName: "holdfast.lock") }
        #expect(error?.description.contains("(above \(run)) has mode 0777 without the sticky bit") == true, "\(error?.description ?? "")")
        // With the sticky bit (as /tmp has) nobody else can rename or remove what is ours.
        chmod(above, 0o1777)
        let lock = try RunDirectory.claim(run, lockName: "holdfast.lock")
        withExtendedLifetime(lock) {}
    }

    @Test(.enabled(if: Self.isRoot, "needs root: the link belongs to another user"))
    func aSymbolicLinkAnotherUserOwnsOnTheWayIsRefused() throws {
        let base = try TemporaryDirectory()
        defer { base.remove() }
        mkdir(base.file("real"), 0o755)
        symlink(base.file("real"), base.file("link"))
        lchown(base.file("link"), Self.nobody, Self.nobody)
        let error = #expect(throws: RunDirectory.Refusal.self) { try RunDirectory.claim(base.file("link/run"), lockName: "x.lock") }
        #expect(error?.description.contains("is a symbolic link owned by uid 65534") == true, "\(error?.description ?? "")")
        // Ours (root's) is fine.
        lchown(base.file("link"), geteuid(), getegid())
        let lock = try RunDirectory.claim(base.file("link/run"), lockName: "x.lock")
        withExtendedLifetime(lock) {}
    }

    @Test func aSecondClaimIsRefusedWithTheHoldersPIDUntilItIsReleased() async throws {
        let base = try TemporaryDirectory()
        defer { base.remove() }
        var first: RunDirectoryLock? = try RunDirectory.claim(base.path, lockName: "holdfast.lock")
        let error = #expect(throws: RunDirectory.Refusal.self) { try RunDirectory.claim(base.path, lockName: "holdfast.lock") }
        #expect(error?.description.contains("already running on \(base.path), pid \(getpid())") == true, "\(error?.description ?? "")")
        // Another lock name is another server (the daemon and host serve share a directory).
        let other = try RunDirectory.claim(base.path, lockName: "host.lock")
        withExtendedLifetime(first) {}
        first = nil
        // Released with the lock's fd. Another test's spawn may have forked this process a moment
        // ago and hold a copy of the fd until its exec (close-on-exec): a bounded wait for that,
        // sleeping as a task does (a blocking usleep held a concurrency pool thread throughout).
        func claimAgain() async throws -> RunDirectoryLock {
            let deadline = ContinuousClock.now + .seconds(30)
            while true {
                let attempt = Result { () throws(RunDirectory.Refusal) -> RunDirectoryLock in
                    try RunDirectory.claim(base.path, lockName: "holdfast.lock")
                }
                if case .success = attempt { return try attempt.get() }
                if ContinuousClock.now >= deadline { return try attempt.get() }
                try await Task.sleep(for: .milliseconds(10))
            }
        }
        let again = try await claimAgain()
        withExtendedLifetime((other, again)) {}
    }

    @Test func onlyAStaleSocketOfOurOwnIsReplaced() throws {
        let base = try TemporaryDirectory()
        defer { base.remove() }
        let lock = try RunDirectory.claim(base.path, lockName: "holdfast.lock")
        defer { withExtendedLifetime(lock) {} }
        // Nothing there: nothing to do.
        try RunDirectory.prepareSocket(base.file("absent.sock"), runDirectory: base.path)
        // A previous instance's socket (ours, nobody listening): removed.
        makeStaleSocket(base.file("stale.sock"))
        try RunDirectory.prepareSocket(base.file("stale.sock"), runDirectory: base.path)
        #expect(access(base.file("stale.sock"), F_OK) != 0)
        // One a process listens on: refused, left alone.
        let live = try Listener(binding: .unix(path: base.file("live.sock")))
        defer { live.close() }
        let liveBefore = Self.identity(base.file("live.sock"))
        let error = #expect(throws: RunDirectory.Refusal.self) { try RunDirectory.prepareSocket(base.file("live.sock"), runDirectory: base.path) }
        #expect(error?.description.contains("another process listens on it") == true)
        #expect(Self.identity(base.file("live.sock"))?.inode == liveBefore?.inode)
        // Not a socket: refused, left alone.
        try writeFile(base.file("file.sock"), [1, 2, 3])
        #expect(throws: RunDirectory.Refusal.self) { try RunDirectory.prepareSocket(base.file("file.sock"), runDirectory: base.path) }
        #expect(readFile(base.file("file.sock")) == [1, 2, 3])
    }

    @Test(.enabled(if: Self.isRoot, "needs root: the socket belongs to another user"))
    func aSocketAnotherUserPutThereIsNeverUnlinked() throws {
        let base = try TemporaryDirectory()
        defer { base.remove() }
        let lock = try RunDirectory.claim(base.path, lockName: "holdfast.lock")
        defer { withExtendedLifetime(lock) {} }
        makeStaleSocket(base.file("control.sock"))
        chown(base.file("control.sock"), Self.nobody, Self.nobody)
        let before = Self.identity(base.file("control.sock"))
        let error = #expect(throws: RunDirectory.Refusal.self) {
            try RunDirectory.prepareSocket(base.file("control.sock"), runDirectory: base.path)
        }
        #expect(error?.description.contains("a socket owned by uid 65534") == true, "\(error?.description ?? "")")
        let after = Self.identity(base.file("control.sock"))
        #expect(after?.inode == before?.inode && after?.owner == Self.nobody)
        #expect(throws: RunDirectory.Refusal.self) { try RunDirectory.checkBeforeConnecting(to: base.file("control.sock")) }
    }

    @Test func aSocketOutsideTheRunDirectoryHasItsOwnDirectoryChecked() throws {
        let base = try TemporaryDirectory()
        defer { base.remove() }
        let run = base.file("run")
        let lock = try RunDirectory.claim(run, lockName: "holdfast.lock")
        defer { withExtendedLifetime(lock) {} }
        mkdir(base.file("open"), 0o777)
        chmod(base.file("open"), 0o777)
        let error = #expect(throws: RunDirectory.Refusal.self) {
            try RunDirectory.prepareSocket(base.file("open/metrics.sock"), runDirectory: run)
        }
        #expect(error?.description.contains("mode 0777") == true, "\(error?.description ?? "")")
    }
}

/// The scan behind "the broker's uid is its own", and `broker.user`'s forms.
@Suite("Processes by uid, from /proc; broker users", .timeLimit(.minutes(5)))
struct ProcessScanTests {
    @Test func aBareUIDNeedsNoPasswordEntry() {
        let bare = UserAccount.resolve("uid:65600")
        #expect(bare?.name == "uid:65600" && bare?.uid == 65600 && bare?.gid == 65600)
        #expect(UserAccount.resolve("root")?.uid == 0, "a name is looked up")
        for bad in ["uid:", "uid:0", "uid:-1", "uid:4294967295", "uid:1x", "uid: 5", "uid:+5"] {
            #expect(UserAccount.resolve(bad) == nil, "\(bad)")
        }
    }

    @Test(.enabled(if: geteuid() == 0, "needs root: processes as another uid"))
    func aLiveProcessIsFoundAndAZombieIsNot() async throws {
        let uid = ReservedUIDs.unused()
        #expect(ProcessScan.processes(withUID: uid).isEmpty, "unused means unused")
        let processes = TestProcesses()
        defer { processes.killAll() }
        let live = try processes.start(["sleep", "300"], user: uid)
        let done = try processes.start(["true"], user: uid)
        try await eventually("the finished one to be a zombie (exited, not reaped)") {
            String(decoding: readFile("/proc/\(done)/status") ?? [], as: UTF8.self).contains("State:\tZ")
        }
        #expect(ProcessScan.processes(withUID: uid) == [live], "a zombie can signal nobody")
        #expect(ProcessScan.uids(of: live) == [uid, uid, uid, uid])
        #expect(ReservedUIDs.unused() != uid, "a uid in use is not handed out")
    }

    /// Who can see the broker: a process in this pid namespace, not one in a namespace below
    /// (`unshare --pid --fork`: its child is pid 1 of a new one, as a runc container's is).
    @Test(.enabled(if: geteuid() == 0 && access("/usr/bin/unshare", X_OK) == 0, "needs root and unshare(1)"))
    func aProcessInAPIDNamespaceBelowIsToldApart() async throws {
        #expect(ProcessScan.sharesOurPIDNamespace(getpid()) == true)
        #expect(PIDNamespace.isOurs("/proc/self/ns/pid") == true)
        #expect(PIDNamespace.isOurs("/nonexistent/ns/pid") == nil, "cannot be looked at: nil, not a guess")
        let processes = TestProcesses()
        defer { processes.killAll() }
        let unshare = try processes.start(["/usr/bin/unshare", "--pid", "--fork", "--kill-child", "sleep", "300"])
        #expect(ProcessScan.sharesOurPIDNamespace(unshare) == true, "unshare itself stays in ours")
        var below: pid_t = 0
        try await eventually("unshare's child") {
            below = ProcessAccount.children(of: unshare, named: "sleep").first ?? 0
            return below > 0
        }
        #expect(ProcessScan.sharesOurPIDNamespace(below) == false, "its child is in a namespace below")
    }
}
