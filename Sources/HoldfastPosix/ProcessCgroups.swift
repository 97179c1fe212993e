import HoldfastCore
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// A cgroup v2 directory of its own for each direct process, all under one directory of this
/// daemon's (`<its cgroup>/holdfast-<tag>/`).
///
/// Why: a process group does not hold what a process starts. A child that calls `setsid` (a
/// daemon's double fork, `setsid` in a script) leaves it, keeps the process's output open, and a
/// stop's SIGKILL to the group misses it; and once the leader is reaped, the group is only a
/// number. A cgroup holds every descendant, whatever it does with sessions (only a privileged
/// process can move itself out), and `cgroup.kill` (Linux 5.14) kills them all at once without
/// a signal ever going to a number.
///
/// Only cgroup's core files are used (`cgroup.procs`, `cgroup.kill`, `cgroup.events`): no
/// controller is enabled, so the "no processes in an inner cgroup" rule never applies and the
/// daemon stays in its own cgroup. Where there is no writable unified hierarchy or no
/// `cgroup.kill` (`open` says why), the daemon goes on with process groups.
public final class ProcessCgroups: Sendable {
    /// Why the daemon runs without process cgroups.
    public enum Unavailable: Error, Sendable, CustomStringConvertible {
        /// No cgroup2 mount shows this process's cgroup (a cgroup v1-only or cgroup-less system).
        case noUnifiedHierarchy
        case cannotCreate(SystemError)
        /// The kernel has no `cgroup.kill` (before Linux 5.14).
        case noCgroupKill(String)

        public var description: String {
            switch self {
            case .noUnifiedHierarchy: return "no cgroup v2 (unified) hierarchy is mounted that shows this process's cgroup"
            case .cannotCreate(let error): return "cannot create a cgroup: \(error)"
            case .noCgroupKill(let directory): return "\(directory) has no cgroup.kill (it needs Linux 5.14)"
            }
        }
    }

    /// `<this process's cgroup>/holdfast-<tag>`: every process cgroup is a directory in it.
    public let directory: String
    private struct Names {
        /// The cgroups whose process the daemon still tracks: never removed as idle.
        var tracked: Set<String> = []
        /// Released ones that still held something (what a process left running): removed
        /// once empty, at a later `release` (a few of them, in turn) or `removeIdle` (all).
        /// Kept apart so that a process's end tries a few rmdirs, not a listing of thousands of
        /// cgroups. Oldest try first: each retry goes to the back.
        var lingering: [String] = []
    }

    private let names = NIOLockedValueBox(Names())

    static let namePrefix = "process-"

    private init(directory: String) {
        self.directory = directory
    }

    /// The tag of a daemon's directory: from its run directory, which one daemon holds at a time.
    public static func tag(runDirectory: String) -> String {
        var digest = StreamingSHA256()
        Array(runDirectory.utf8).withUnsafeBytes { digest.update($0) }
        return String(digest.hex().prefix(16))
    }

    /// Finds this process's cgroup and creates (or reuses) `holdfast-<tag>` in it. `tag` must
    /// name this daemon alone (a hash of its run directory, which one daemon holds at a time):
    /// two daemons in one cgroup keep apart, and a restarted daemon finds what its predecessor
    /// left.
    public static func open(tag: String) -> Result<ProcessCgroups, Unavailable> {
        guard let mountinfo = readSmallFile("/proc/self/mountinfo"), let own = readSmallFile("/proc/self/cgroup"),
            let base = CgroupLocation.directory(mountinfo: mountinfo, procCgroup: own)
        else { return .failure(.noUnifiedHierarchy) }
        let directory = base + "/holdfast-" + tag
        if mkdir(directory, 0o755) != 0, errno != EEXIST {
            return .failure(.cannotCreate(.last("mkdir(\(directory))")))
        }
        guard access(directory + "/cgroup.kill", W_OK) == 0 else {
            rmdir(directory)
            return .failure(.noCgroupKill(directory))
        }
        return .success(ProcessCgroups(directory: directory))
    }

    /// A new, empty cgroup for a process about to start: its name (kept with the process) and
    /// its `cgroup.procs`, open for `SpawnOptions.cgroupProcs` (the caller closes it).
    public func create() throws(SystemError) -> (name: String, procs: Int32) {
        while true {
            let name = Self.namePrefix + String(UInt64.random(in: 1...UInt64.max), radix: 16)
            let path = directory + "/" + name
            // Tracked before it exists, and `removeIdle` (another process done, on another
            // thread) removes only released ones: never this one between its mkdir and the
            // child joining it (it did when it removed whatever it listed untracked: the join
            // failed with ENODEV).
            guard names.withLockedValue({ $0.tracked.insert(name).inserted }) else { continue }
            guard mkdir(path, 0o755) == 0 else {
                let error = SystemError.last("mkdir(\(path))")
                names.withLockedValue { _ = $0.tracked.remove(name) }
                if error.errno == .fileExists { continue }
                throw error
            }
            let procs = Glibc.open(path + "/cgroup.procs", O_WRONLY | O_CLOEXEC)
            guard procs >= 0 else {
                let error = SystemError.last("open(\(path)/cgroup.procs)")
                rmdir(path)
                names.withLockedValue { _ = $0.tracked.remove(name) }
                throw error
            }
            return (name, procs)
        }
    }

    /// After a live upgrade: the cgroups of the processes the earlier image handed over are
    /// tracked, and every other one there is lingering (what a done process left running).
    public func track(_ handedOver: some Sequence<String>) {
        let present = cgroupNames()
        names.withLockedValue { names in
            names.tracked.formUnion(handedOver.filter(Self.isProcessCgroupName))
            names.lingering = present.filter { !names.tracked.contains($0) }
        }
    }

    /// The process is done: its cgroup goes as soon as it is empty (now, or once what the
    /// process left running ends and a later release or `removeIdle` finds it so). Each release
    /// also tries `lingeringTriedPerRelease` of the lingering ones, in turn: trying every one
    /// cost each exit as many rmdirs as cgroups lingered (each taking the kernel's cgroup lock,
    /// which runc and every create need too) — thousands of them with a container that leaves
    /// something running behind each process.
    public func release(_ name: String) {
        names.withLockedValue { names in
            guard names.tracked.remove(name) != nil else { return }
            if rmdir(directory + "/" + name) != 0, errno != ENOENT { names.lingering.append(name) }
            retryLingering(&names, atMost: Self.lingeringTriedPerRelease)
        }
    }

    /// How many lingering cgroups a release tries to remove.
    public static let lingeringTriedPerRelease = 8

    /// Tries the oldest `limit` lingering cgroups; those still not empty go to the back.
    private func retryLingering(_ names: inout Names, atMost limit: Int) {
        let tried = min(limit, names.lingering.count)
        guard tried > 0 else { return }
        let still = names.lingering.prefix(tried).filter { rmdir(directory + "/" + $0) != 0 && errno != ENOENT }
        names.lingering.removeFirst(tried)
        names.lingering.append(contentsOf: still)
    }

    /// SIGKILL to every process in the cgroup `name` (`cgroup.kill`). False if the kernel refused
    /// (the cgroup is gone).
    @discardableResult
    public func kill(_ name: String) -> Bool {
        guard Self.isProcessCgroupName(name) else { return false }
        return Self.writeControl(directory + "/" + name + "/cgroup.kill", "1")
    }

    /// Whether any process is still in the cgroup `name` (`cgroup.events`: `populated 1`); false
    /// once it is empty or gone.
    public func isPopulated(_ name: String) -> Bool {
        guard let events = readSmallFile(directory + "/" + name + "/cgroup.events") else { return false }
        return events.split(separator: "\n").contains("populated 1")
    }

    /// The CPU time everything in the cgroup `name` used (`cpu.stat`'s `usage_usec`, there
    /// without the cpu controller), in seconds, and how many processes are in it now; nil when
    /// the cgroup is gone.
    public func usage(_ name: String) -> (cpuSeconds: Double, tasks: Int)? {
        guard Self.isProcessCgroupName(name), let stat = readSmallFile(directory + "/" + name + "/cpu.stat") else { return nil }
        let line = stat.split(separator: "\n").first { $0.hasPrefix("usage_usec ") }
        guard let microseconds = line.flatMap({ UInt64($0.dropFirst("usage_usec ".count)) }) else { return nil }
        return (Double(microseconds) / 1_000_000, members(name).count)
    }

    /// The pids in the cgroup `name`, for status and tests.
    public func members(_ name: String) -> [pid_t] {
        guard let procs = readSmallFile(directory + "/" + name + "/cgroup.procs") else { return [] }
        return procs.split(separator: "\n").compactMap { pid_t($0) }
    }

    /// Removes every cgroup that is no process's any more and is empty. One that still holds
    /// something (what a process left running after its exit was taken) stays until it empties.
    public func removeIdle() {
        names.withLockedValue { names in retryLingering(&names, atMost: names.lingering.count) }
    }

    /// Kills everything in every process cgroup, waits (up to `bound`) until they are empty,
    /// and removes them: the end of a stop, and a fresh start's clean-up of what a crashed
    /// predecessor left. Returns the cgroups that were still not empty at the bound (a process
    /// stuck in the kernel: uninterruptible sleep).
    @discardableResult
    public func endEverything(within bound: Duration) async -> [String] {
        let deadline = ContinuousClock.now + bound
        var left = killEverything()
        while true {
            left = removeEmptied(left)
            if left.isEmpty || ContinuousClock.now >= deadline { return left }
            try? await Task.sleep(for: .milliseconds(5))
        }
    }

    /// `endEverything` for a caller that cannot suspend (a test's clean-up): the same, blocking.
    @discardableResult
    public func endEverythingBlocking(within bound: Duration) -> [String] {
        let deadline = ContinuousClock.now + bound
        var left = killEverything()
        while true {
            left = removeEmptied(left)
            if left.isEmpty || ContinuousClock.now >= deadline { return left }
            usleep(5000)
        }
    }

    private func killEverything() -> [String] {
        self.names.withLockedValue { $0 = Names() }
        let names = cgroupNames()
        for name in names { kill(name) }
        return names
    }

    /// Removes those of `names` that are empty; returns the rest.
    private func removeEmptied(_ names: [String]) -> [String] {
        names.filter { rmdir(directory + "/" + $0) != 0 && errno != ENOENT }
    }

    /// Removes the daemon's directory (empty by now: after `endEverything`).
    public func removeDirectory() {
        rmdir(directory)
    }

    /// The names of the process cgroups in the daemon's directory.
    public func cgroupNames() -> [String] {
        Self.processCgroupNames(in: directory)
    }

    /// The names of the process cgroups in `directory` (a daemon's `holdfast-<tag>`).
    public static func processCgroupNames(in directory: String) -> [String] {
        guard let handle = opendir(directory) else { return [] }
        defer { closedir(handle) }
        var names: [String] = []
        while let entry = readdir(handle) {
            guard entry.pointee.d_type == UInt8(DT_DIR) else { continue }
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if isProcessCgroupName(name) { names.append(name) }
        }
        return names
    }

    static func isProcessCgroupName(_ name: String) -> Bool {
        name.hasPrefix(namePrefix) && !name.contains("/") && name != namePrefix
    }

    /// Writes a control file of cgroupfs (one write: the kernel takes it whole or refuses it).
    static func writeControl(_ path: String, _ text: String) -> Bool {
        let fd = Glibc.open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        while true {
            let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if written < 0 && errno == EINTR { continue }
            return written == bytes.count
        }
    }
}
