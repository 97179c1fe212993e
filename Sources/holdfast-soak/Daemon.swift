import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// A real `holdfast daemon` in a private run directory, as `holdfast demo` and the daemon
/// tests start one: a temp config pointing the bridge at the in-process host, the broker as
/// an unused uid of its own (`ReservedUIDs`). Ended by pid.
struct Daemon: Sendable {
    let pid: pid_t
    let directory: String
    var controlSocket: String { directory + "/control.sock" }
    var logPath: String { directory + "/daemon.log" }

    /// The daemon runs from its own copy, `holdfast`: a live upgrade re-executes what is at that
    /// path. `holdfast.real` is a second copy, and `bin/daemon` (first on the daemon's PATH) what
    /// the binary that falls back runs (`installBinaryThatFallsBack`).
    var installedBinary: String { directory + "/holdfast" }

    /// The bridge key must be in `directory` already (`Host` writes it).
    static func start(executable: String, directory: String) throws -> Daemon {
        // HOLDFAST_SOAK_SECCOMP=log lets a heap profiler attach to the broker (RELIABILITY.md).
        let seccomp = getenv("HOLDFAST_SOAK_SECCOMP").map { String(cString: $0) } ?? "kill"
        let config = """
            # holdfast-soak: production defaults except where the sockets live, who the broker
            # is, and the drain timeout. The host here always comes back, so any byte given up
            # on is a loss; the timeout's own job (a host that never returns) is tested apart,
            # and the default 30 s can run out on a starved 2-core CI machine.
            run_directory: \(directory)
            streams:
              drain_timeout: 300s
            bridge:
              address: "unix:{run}/host-bridge.sock"
              key_file: "{run}/bridge.key"
            broker:
              user: "uid:\(ReservedUIDs.unused())"
              seccomp: \(seccomp)
            shutdown:
              grace: 2s
              timeout: 20s
            """
        try WholeFile.write(directory + "/holdfast.yaml", Array(config.utf8))
        guard let image = WholeFile.read(executable) else { throw SystemError.last("read(\(executable))") }
        for copy in ["/holdfast", "/holdfast.real"] {
            try WholeFile.write(directory + copy, image, mode: 0o755)
            chmod(directory + copy, 0o755)
        }
        // Run as `daemon --config FILE --resume-from FD` by env(1) (the binary that falls back):
        // after the daemon's check of it, the real binary starts on a configuration file that is
        // not there, and cannot take over. Builtins only: this shell runs as the daemon's pid, so
        // every container process is its child, and a shell that waits for a child of its own
        // (an `mv`) reaps whichever child exits then — a container's exit was lost so.
        mkdir(directory + "/bin", 0o755)
        let script = """
            #!/bin/sh
            if [ "$3" = "--resume-from" ]; then exec \(directory)/holdfast.real daemon --config \(directory)/gone.yaml "$3" "$4"; fi
            exec \(directory)/holdfast.real daemon "$@"

            """
        try WholeFile.write(directory + "/bin/daemon", Array(script.utf8), mode: 0o755)
        chmod(directory + "/bin/daemon", 0o755)
        let log = open(directory + "/daemon.log", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard log >= 0 else { throw SystemError.last("open(daemon.log)") }
        defer { close(log) }
        let installed = directory + "/holdfast"
        var options = SpawnOptions(executable: installed, arguments: [installed, "daemon", "--config", directory + "/holdfast.yaml"])
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
        options.environment = SpawnOptions.inheritedEnvironment().filter { !$0.hasPrefix("PATH=") } + ["PATH=\(directory)/bin:\(path)"]
        options.stdout = log
        options.stderr = log
        options.parentDeathSignal = SIGKILL
        return Daemon(pid: try Spawner.spawn(options), directory: directory)
    }

    var isAlive: Bool { kill(pid, 0) == 0 && !isZombie(pid) }

    /// Puts at the daemon's path a binary that passes the upgrade's check but cannot take over:
    /// a copy of env(1), which runs `bin/daemon` (see `start`).
    func installBinaryThatFallsBack() throws(SystemError) {
        try replace(installedBinary, with: "/usr/bin/env")
    }

    /// The daemon's own binary back at its path.
    func restoreBinary() throws(SystemError) {
        try replace(installedBinary, with: directory + "/holdfast.real")
    }

    /// Written aside and renamed over: the running image's file is never written to.
    private func replace(_ path: String, with source: String) throws(SystemError) {
        guard let bytes = WholeFile.read(source) else { throw .last("read(\(source))") }
        let aside = directory + "/.holdfast.new"
        try WholeFile.write(aside, bytes, mode: 0o755)
        chmod(aside, 0o755)
        guard rename(aside, path) == 0 else { throw .last("rename(\(aside), \(path))") }
    }

    /// `holdfast status --json`, over the control socket; bounded (closing the connection ends
    /// a call that overruns).
    func status(timeout: Duration) async throws -> StatusReport {
        let client = try await ControlClient.connect(to: controlSocket)
        let timer = Task {
            try await Task.sleep(for: timeout)
            client.close()
        }
        defer {
            timer.cancel()
            client.close()
        }
        return try await client.call(SupervisorRequest.status, reply: StatusReport.self)
    }

    /// SIGTERM, then a bounded wait for the graceful shutdown; SIGKILL if it overruns
    /// (`killed` says so).
    func stop(timeout: Duration) async -> (status: ExitStatus?, killed: Bool) {
        kill(pid, SIGTERM)
        let killed = NIOLockedValueBox(false)
        let timer = Task { [pid] in
            try await Task.sleep(for: timeout)
            killed.withLockedValue { $0 = true }
            kill(pid, SIGKILL)
        }
        let status = try? await Spawner.waitForExit(pid)
        timer.cancel()
        return (status, killed.withLockedValue { $0 })
    }

    /// The reactor takeovers the daemon's log reports, by role.
    var takeovers: String {
        let lines = String(decoding: WholeFile.read(logPath) ?? [], as: UTF8.self).split(separator: "\n")
            .filter { $0.contains("I/O thread stuck in the kernel") }
        let broker = lines.filter { $0.contains("role=broker") }.count
        return "broker \(broker), supervisor \(lines.filter { $0.contains("role=supervisor") }.count)"
    }

    var logTail: String {
        String(decoding: (WholeFile.read(logPath) ?? []).suffix(4000), as: UTF8.self)
    }
}

func isZombie(_ pid: pid_t) -> Bool {
    let stat = String(decoding: WholeFile.read("/proc/\(pid)/stat") ?? [], as: UTF8.self)
    guard let close = stat.lastIndex(of: ")") else { return true }
    return stat[stat.index(after: close)...].dropFirst().first == "Z"
}

/// One process's open fds and resident memory, from /proc.
struct Footprint: Sendable, Equatable {
    var pid: pid_t
    /// fd number → what it is ("socket", "pipe", "anon_inode:[eventfd]", a path...).
    var table: [Int32: String]
    var residentKiB: Int
    /// The anonymous part of it (RssAnon: heap, arenas, stacks): what a leak grows; the rest is
    /// file pages (the binary's code, touched as new paths run) and shared memory.
    var anonymousKiB = 0

    var descriptors: Int { table.count }

    /// How many fds of each kind.
    var kinds: [String: Int] { table.values.reduce(into: [:]) { $0[$1, default: 0] += 1 } }

    static func of(_ pid: pid_t) -> Footprint? {
        guard let directory = opendir("/proc/\(pid)/fd") else { return nil }
        var table: [Int32: String] = [:]
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let fd = Int32(name) else { continue }
            var target = [CChar](repeating: 0, count: 512)
            let length = readlink("/proc/\(pid)/fd/\(name)", &target, target.count - 1)
            var what = String(decoding: target[..<max(0, length)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            // "socket:[12345]" → "socket": the inode differs between otherwise equal tables.
            if let bracket = what.firstIndex(of: "["), what.hasPrefix("socket:") || what.hasPrefix("pipe:") {
                what = String(what[..<what.index(before: bracket)])
            }
            // A timerfd says which clock it counts (the runtime makes one per clock it uses).
            if what == "anon_inode:[timerfd]" {
                let info = String(decoding: WholeFile.read("/proc/\(pid)/fdinfo/\(name)") ?? [], as: UTF8.self)
                if let line = info.split(separator: "\n").first(where: { $0.hasPrefix("clockid:") }) {
                    what += " clock " + line.dropFirst("clockid:".count).trimmingPrefix(while: { $0 == " " || $0 == "\t" })
                }
            }
            table[fd] = what
        }
        closedir(directory)
        let status = String(decoding: WholeFile.read("/proc/\(pid)/status") ?? [], as: UTF8.self)
        var rss = 0
        var anonymous = 0
        for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") || line.hasPrefix("RssAnon:") {
            let kib = Int(line.split(whereSeparator: { $0 == " " || $0 == "\t" }).dropFirst().first ?? "") ?? 0
            if line.hasPrefix("VmRSS:") { rss = kib } else { anonymous = kib }
        }
        // A kernel without RssAnon (before 4.5): the whole RSS stands for it.
        return Footprint(pid: pid, table: table, residentKiB: rss, anonymousKiB: status.contains("RssAnon:") ? anonymous : rss)
    }
}

/// The three roles' footprints at one moment.
struct RoleFootprints: Sendable {
    var supervisor: Footprint
    var broker: Footprint
    var bridge: Footprint
    /// The broker's malloc, from its `stats`: in use (a leak grows it) and free inside its
    /// arenas (fragmentation); nil if the stats did not come.
    var brokerMalloc: (inUseKiB: Int, freeKiB: Int)?
    /// The supervisor's malloc, from its status report, the same two figures.
    var supervisorMalloc: (inUseKiB: Int, freeKiB: Int)?
    /// The broker's live process and stream objects (zero when quiet, unless leaked).
    var brokerObjects: (processes: Int, streams: Int)?

    var all: [(String, Footprint)] { [("supervisor", supervisor), ("broker", broker), ("bridge", bridge)] }
}

/// Whether a role's fds now agree with the baseline: the same, kind by kind. A role restarted
/// since (a killed bridge worker; a new pid) may lack the timerfds the Swift runtime opens
/// lazily, one per clock, at the first timer on that clock — a worker that has not slept yet
/// has none for CLOCK_BOOTTIME. Fewer of those is not a leak; anything more, or fewer of any
/// other kind, still fails.
func fdsAgree(baseline: Footprint, now: Footprint) -> Bool {
    if now.kinds == baseline.kinds { return true }
    guard now.pid != baseline.pid else { return false }
    for kind in Set(baseline.kinds.keys).union(now.kinds.keys) {
        let then = baseline.kinds[kind] ?? 0
        let count = now.kinds[kind] ?? 0
        if kind.hasPrefix("anon_inode:[timerfd]") ? count > then : count != then { return false }
    }
    return true
}

/// What differs between two fd tables, by kind: "+1 socket, -1 anon_inode:[pidfd]".
func fdDifference(from before: Footprint, to after: Footprint) -> String {
    let kinds = Set(before.kinds.keys).union(after.kinds.keys).sorted()
    return kinds.compactMap { kind -> String? in
        let change = (after.kinds[kind] ?? 0) - (before.kinds[kind] ?? 0)
        return change == 0 ? nil : (change > 0 ? "+" : "") + "\(change) \(kind)"
    }.joined(separator: ", ")
}

/// Where a process's resident memory is, from /proc/PID/smaps: shared libraries and the
/// binary, malloc's main heap and its per-thread arenas, thread stacks, and the blocks the
/// broker's buffer pools hand out (64 KiB ring blocks and 128 KiB relay buffers: each its own
/// mmap, 68 and 132 KiB with malloc's header) — to tell a leak from caches and fragmentation.
func memoryBreakdown(_ pid: pid_t) -> String {
    let text = String(decoding: WholeFile.read("/proc/\(pid)/smaps") ?? [], as: UTF8.self)
    var files = 0, heap = 0, arenas = 0, stacks = 0, other = 0
    var ringBlocks = (count: 0, kib: 0), relayBuffers = (count: 0, kib: 0)
    var size = 0
    var name = ""
    for line in text.split(separator: "\n") {
        let fields = line.split(separator: " ", omittingEmptySubsequences: true)
        guard let first = fields.first else { continue }
        if first.contains("-"), !first.hasSuffix(":") {
            let bounds = first.split(separator: "-").compactMap { UInt64($0, radix: 16) }
            size = bounds.count == 2 ? Int((bounds[1] - bounds[0]) / 1024) : 0
            name = fields.count > 5 ? String(fields[5]) : ""
            continue
        }
        guard first == "Rss:", fields.count >= 2, let rss = Int(fields[1]) else { continue }
        switch (name, size) {
        case let (n, _) where n.hasPrefix("/"): files += rss
        case ("[heap]", _): heap += rss
        case ("[stack]", _), ("", 8192): stacks += rss
        case ("", 68):
            ringBlocks.count += 1
            ringBlocks.kib += rss
        case ("", 132):
            relayBuffers.count += 1
            relayBuffers.kib += rss
        case let ("", s) where s >= 1024: arenas += rss
        default: other += rss
        }
    }
    return "files \(mib(files)), heap \(mib(heap)), arenas \(mib(arenas)), stacks \(mib(stacks)), "
        + "64K blocks \(ringBlocks.count) (\(mib(ringBlocks.kib))), 128K buffers \(relayBuffers.count) (\(mib(relayBuffers.kib))), other \(mib(other))"
}
