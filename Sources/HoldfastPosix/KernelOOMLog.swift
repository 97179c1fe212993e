import HoldfastCore
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// Which of the supervisor's processes the kernel's OOM killer killed, read from the kernel's
/// own log (`/dev/kmsg`): its "Killed process PID (COMM)" record names the very process, for a
/// direct process as for a container's, whatever cgroups the guest has — where a SIGKILL alone
/// says nothing of who sent it.
///
/// Only the kernel's own OOM records count (`KernelLogRecord.oomKilledPID`), and only for a
/// process being watched, by its id: the log is read up to now before each process is started
/// (`mark`), then the process is watched from that mark (`watch`), so a record of an earlier
/// process that had the same pid was read before the mark, and the process's own record counts
/// even when another read took it before the watch. Its exit takes the answer by id (`take`), so
/// a new process that took the pid meanwhile does not take it instead. (Left: an earlier holder
/// killed and reaped in the instant between the mark and the fork or `runc create` that reuses
/// its pid at once: near `pid_max`, or with the pid counter moved back by root.)
///
/// Reads never block (`O_NONBLOCK`), and one read of the log stops after `recordsPerRead`
/// records, so a kernel that logs without end cannot hold the supervisor; where a record of the
/// process may have gone unread (the kernel overwrote records before they were read, or the read
/// at its exit stopped at that bound), the answer is "not known", never a guess.
public final class KernelOOMLog: Sendable {
    /// Where the log had been read to: what a process is watched from.
    public struct Mark: Sendable, Equatable {
        var sequence: UInt64?
    }

    /// Why the daemon goes without the log.
    public enum Unavailable: Error, Sendable, CustomStringConvertible {
        case cannotOpen(SystemError)
        /// The kernel names processes by their pid in the guest's first pid namespace.
        case notInTheInitialPIDNamespace

        public var description: String {
            switch self {
            case .cannotOpen(let error): return "\(error)"
            case .notInTheInitialPIDNamespace:
                return "the daemon runs in a pid namespace of its own: the kernel's records name pids of the guest's first one"
            }
        }
    }

    /// What a live upgrade hands to the next image: the log's fd (its read position goes with
    /// it), the processes watched with nothing unread since, and those of them killed.
    public struct Handover: Codable, Sendable, Equatable {
        public var descriptor: Int32
        public var watched: [String: Int32]
        public var killed: [String]

        public init(descriptor: Int32, watched: [String: Int32], killed: [String]) {
            self.descriptor = descriptor
            self.watched = watched
            self.killed = killed
        }
    }

    private struct Watcher {
        var pid: pid_t
        /// `overruns` when it was watched: a record of it may have been overwritten since.
        var overrunsBefore: Int
        /// Records read between its mark and its watch may have been dropped from `recentKills`.
        var unknown: Bool
    }

    private struct State {
        var watchers: [String: Watcher] = [:]
        /// Which watched process holds each pid now.
        var owners: [pid_t: String] = [:]
        var killed: Set<String> = []
        /// The OOM killer's last records (pid, sequence), for processes watched after their
        /// record was read; and the newest one dropped from it.
        var recentKills: [(pid: pid_t, sequence: UInt64)] = []
        var droppedThrough: UInt64?
        var lastSequence: UInt64?
        /// How many times the kernel overwrote records before they were read (EPIPE).
        var overruns = 0
    }

    public let descriptor: Int32
    private let state: NIOLockedValueBox<State>
    let recordsPerRead: Int
    static let recentKillsKept = 256

    /// Reads records from `fd` (owned from here on): `/dev/kmsg`, or in tests a socket that
    /// gives one record per read as it does.
    init(fd: Int32, watched: [String: Int32] = [:], killed: [String] = [], recordsPerRead: Int = 4096) {
        descriptor = fd
        self.recordsPerRead = recordsPerRead
        var state = State()
        for (id, pid) in watched {
            state.watchers[id] = Watcher(pid: pid, overrunsBefore: 0, unknown: false)
            state.owners[pid] = id
        }
        state.killed = Set(killed).intersection(watched.keys)
        self.state = NIOLockedValueBox(state)
    }

    /// Opens the kernel's log from its end: nothing logged before counts.
    public static func open() throws(Unavailable) -> KernelOOMLog {
        guard inTheInitialPIDNamespace else { throw .notInTheInitialPIDNamespace }
        let fd = Glibc.open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { throw .cannotOpen(.last("open(/dev/kmsg)")) }
        guard lseek(fd, 0, SEEK_END) >= 0 else {
            let error = SystemError.last("lseek(/dev/kmsg)")
            close(fd)
            throw .cannotOpen(error)
        }
        return KernelOOMLog(fd: fd)
    }

    /// After a live upgrade: the log the earlier image read, from where it stopped.
    public static func adopt(_ handover: Handover) -> KernelOOMLog {
        KernelOOMLog(fd: handover.descriptor, watched: handover.watched, killed: handover.killed)
    }

    /// Whether this process is in the guest's first pid namespace (`NSpid` names one pid).
    static var inTheInitialPIDNamespace: Bool {
        guard let status = readSmallFile("/proc/self/status") else { return false }
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("NSpid:") }) else { return true }  // before Linux 4.1
        return line.dropFirst("NSpid:".count).split(whereSeparator: { $0 == " " || $0 == "\t" }).count == 1
    }

    /// Reads the log up to now, before a process is started: it is watched from here.
    public func mark() -> Mark {
        state.withLockedValue { state in
            _ = readLocked(&state)
            return Mark(sequence: state.lastSequence)
        }
    }

    /// Watches process `id`, started after `mark` with `pid`. A record of `pid` read since the
    /// mark is its own.
    public func watch(_ id: String, pid: pid_t, since mark: Mark) {
        state.withLockedValue { state in
            _ = readLocked(&state)
            let after = { (sequence: UInt64) in mark.sequence.map { sequence > $0 } ?? true }
            let unknown = state.droppedThrough.map(after) ?? false
            state.watchers[id] = Watcher(pid: pid, overrunsBefore: state.overruns, unknown: unknown)
            state.owners[pid] = id
            state.killed.remove(id)
            if state.recentKills.contains(where: { $0.pid == pid && after($0.sequence) }) { state.killed.insert(id) }
        }
    }

    /// At process `id`'s exit: whether the OOM killer killed it, the log read up to now (the
    /// OOM killer writes its record while it holds the victim's task lock, which the victim's
    /// exit has to take: the record is there before the exit can be reaped). Nil when that
    /// cannot be known: it was not watched, or a record of it may have gone unread. It is no
    /// longer watched.
    public func take(_ id: String) -> Bool? {
        state.withLockedValue { state in
            let complete = readLocked(&state)
            let killed = state.killed.remove(id) != nil
            guard let watcher = state.watchers.removeValue(forKey: id) else { return killed ? true : nil }
            if state.owners[watcher.pid] == id { state.owners[watcher.pid] = nil }
            if killed { return true }
            guard complete, !watcher.unknown, watcher.overrunsBefore == state.overruns else { return nil }
            return false
        }
    }

    /// Process `id` is no longer watched (its start failed).
    public func forget(_ id: String) {
        state.withLockedValue { state in
            if let watcher = state.watchers.removeValue(forKey: id), state.owners[watcher.pid] == id { state.owners[watcher.pid] = nil }
            state.killed.remove(id)
        }
    }

    /// For a live upgrade: the fd (its position is where this image stopped reading, so the
    /// next one reads on from there), the processes watched with nothing unread since (one whose
    /// record may have gone unread is left out: its answer is not known there either) and those
    /// of them killed.
    public func handover() -> Handover {
        state.withLockedValue { state in
            let whole = state.watchers.filter { !$0.value.unknown && $0.value.overrunsBefore == state.overruns }
            return Handover(descriptor: descriptor, watched: whole.mapValues { $0.pid }, killed: state.killed.sorted())
        }
    }

    /// Reads the log up to now (tests).
    func drainForTests() {
        state.withLockedValue { _ = readLocked(&$0) }
    }

    /// Reads what the kernel logged since the last read; false when it stopped before the end
    /// (its bound, or an error other than "nothing more").
    private func readLocked(_ state: inout State) -> Bool {
        // A record is at most about 8 KiB with its continuation lines; a smaller buffer fails
        // its read with EINVAL.
        var buffer = [UInt8](repeating: 0, count: 16384)
        for _ in 0..<recordsPerRead {
            let count = buffer.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
            if count < 0 {
                switch errno {
                case EINTR: continue
                case EPIPE:
                    // Overwritten before read: the next read goes on from the oldest record left.
                    state.overruns += 1
                    continue
                case EAGAIN: return true
                default: return false
                }
            }
            if count == 0 { return true }
            guard let record = KernelLogRecord.parse(String(decoding: buffer[..<count], as: UTF8.self)) else { continue }
            state.lastSequence = record.sequence
            guard let pid = record.oomKilledPID else { continue }
            if let id = state.owners[pid] { state.killed.insert(id) }
            state.recentKills.append((pid, record.sequence))
            if state.recentKills.count > Self.recentKillsKept {
                state.droppedThrough = state.recentKills.removeFirst().sequence
            }
        }
        return false
    }

    deinit { close(descriptor) }
}
