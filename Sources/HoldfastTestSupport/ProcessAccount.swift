import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// What a process that a test gave up waiting for was doing, and everything under it: the one
/// account a hang leaves, so it is taken before the process is killed.
public enum ProcessAccount {
    /// `root` and its descendants (pid, parent, state, kernel wait channel, name), the threads of
    /// `root` the same way, and — where gdb is installed — the Swift frames of `root`'s threads.
    public static func tree(under root: pid_t) async -> String {
        let table = processTable()
        var lines = ["processes under \(root) (pid ppid state wchan name):"]
        var queue = [root]
        while !queue.isEmpty {
            let pid = queue.removeFirst()
            guard let entry = table[pid] else { continue }
            lines.append("  \(pid) \(entry.parent) \(entry.state) \(line("/proc/\(pid)/wchan")) \(entry.name)")
            queue += table.filter { $0.value.parent == pid }.keys.sorted()
        }
        lines.append("threads of \(root) (tid state wchan name):")
        for tid in numericEntries("/proc/\(root)/task") {
            let stat = Stat(line("/proc/\(root)/task/\(tid)/stat"))
            lines.append("  \(tid) \(stat?.state ?? "?") \(line("/proc/\(root)/task/\(tid)/wchan")) \(stat?.name ?? "?")")
        }
        lines.append(await swiftFrames(of: root))
        return lines.joined(separator: "\n")
    }

    /// gdb's backtrace of every thread, cut to the thread headers and the frames in Swift
    /// sources (a test's and ours: where each thread waits). Bounded: gdb loads a debug test
    /// binary's symbols in seconds, never a minute.
    static func swiftFrames(of pid: pid_t) async -> String {
        let gdb = "/usr/bin/gdb"
        guard access(gdb, X_OK) == 0, let directory = try? TemporaryDirectory("holdfast-account") else {
            return "(no gdb: no stacks)"
        }
        defer { directory.remove() }
        let path = directory.file("gdb.txt")
        let output = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard output >= 0 else { return "(gdb's output file: \(SystemError.last("open")))" }
        let processes = TestProcesses()
        defer { processes.killAll() }
        let started = try? processes.start(
            [gdb, "-p", "\(pid)", "-batch", "-nx", "-ex", "set pagination off", "-ex", "thread apply all bt 40"],
            stdout: output, stderr: output)
        close(output)
        guard let started else { return "(gdb did not start)" }
        let status = try? await processes.wait(started, timeout: .seconds(60))
        let text = String(decoding: readFile(path) ?? [], as: UTF8.self)
        let kept = text.split(separator: "\n").filter { $0.hasPrefix("Thread ") || $0.contains(".swift:") }
        return "gdb (\(status.map { "\($0)" } ?? "timed out")), Swift frames:\n" + kept.prefix(400).joined(separator: "\n")
    }

    /// The state letter of each thread of `pid` (`T`: stopped); empty once it is gone.
    public static func threadStates(of pid: pid_t) -> [String] {
        numericEntries("/proc/\(pid)/task").compactMap { Stat(line("/proc/\(pid)/task/\($0)/stat"))?.state }
    }

    /// Whether `pid` has exited and waits to be reaped.
    /// The children of `parent` whose command name is `name` (all of them without one), sorted.
    public static func children(of parent: pid_t, named name: String? = nil) -> [pid_t] {
        processTable().filter { $0.value.parent == parent && (name == nil || $0.value.name == name) }.map(\.key).sorted()
    }

    public static func isZombie(_ pid: pid_t) -> Bool {
        Stat(line("/proc/\(pid)/stat"))?.state == "Z"
    }

    public struct Stat {
        public var name: String
        public var state: String
        public var parent: pid_t

        /// `pid (name) state ppid ...`: the name may hold spaces and parentheses, so it is
        /// what lies between the first "(" and the last ")".
        public init?(_ line: String) {
            guard let open = line.firstIndex(of: "("), let close = line.lastIndex(of: ")"), open < close else { return nil }
            let rest = line[line.index(after: close)...].split(separator: " ")
            guard rest.count >= 2, let parent = pid_t(rest[1]) else { return nil }
            name = String(line[line.index(after: open)..<close])
            state = String(rest[0])
            self.parent = parent
        }
    }

    static func processTable() -> [pid_t: Stat] {
        var table: [pid_t: Stat] = [:]
        for pid in numericEntries("/proc") {
            if let stat = Stat(line("/proc/\(pid)/stat")) { table[pid] = stat }
        }
        return table
    }

    static func numericEntries(_ directory: String) -> [pid_t] {
        entryNames(directory).compactMap { pid_t($0) }.sorted()
    }

    /// The names in `directory` (without "." and ".."), unsorted; none if it cannot be read.
    public static func entryNames(_ directory: String) -> [String] {
        DirectoryListing.names(directory) ?? []
    }

    /// The first line of a small /proc file, or "-".
    public static func line(_ path: String) -> String {
        guard let bytes = readFile(path) else { return "-" }
        let text = String(decoding: bytes.prefix { $0 != 10 }, as: UTF8.self)
        return text.isEmpty ? "-" : text
    }
}
