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
/// Only the kernel's records count (`KernelLogRecord.facility` 0: what user space writes there
/// cannot claim it), and only for a pid being watched: the log is read (`drain`) up to now
/// before each process is started, then the process's pid is watched, so a record of an earlier
/// process that had the same pid was read before it was watched. (Left: an earlier holder killed
/// and reaped in the instant between that read and the fork that reuses its pid at once: near
/// `pid_max`, or with the pid counter moved back by root.) Reads never block (`O_NONBLOCK`), and
/// one `drain` reads at most `recordsPerDrain` records, so a kernel that logs without end cannot
/// hold the supervisor; where records may have gone unread (that bound reached, or records the
/// kernel overwrote before they were read), the answer is "not known", never a guess.
public final class KernelOOMLog: Sendable {
    private struct State {
        /// Each watched pid, with the count of overruns when it was first watched.
        var watched: [pid_t: Int] = [:]
        var killed: Set<pid_t> = []
        /// The last record read, and the earlier image's last one: records up to it were read
        /// there (after a live upgrade).
        var lastSequence: UInt64?
        var readThrough: UInt64?
        /// How many times records may have gone unread: the kernel overwrote them before they
        /// were read (EPIPE), or a drain stopped at its bound.
        var overruns = 0
    }

    private let fd: Int32
    private let state: NIOLockedValueBox<State>
    let recordsPerDrain: Int

    /// Reads records from `fd` (owned from here on): `/dev/kmsg`, or in tests a socket that
    /// gives one record per read as it does.
    init(fd: Int32, after sequence: UInt64?, watched: [pid_t], killed: [pid_t], recordsPerDrain: Int = 4096) {
        self.fd = fd
        self.recordsPerDrain = recordsPerDrain
        var state = State()
        for pid in watched { state.watched[pid] = 0 }
        state.killed = Set(killed).intersection(watched)
        state.readThrough = sequence
        state.lastSequence = sequence
        self.state = NIOLockedValueBox(state)
    }

    /// Opens the kernel's log. Fresh (`after` nil): from its end, so nothing logged before
    /// counts. After a live upgrade: from its start, skipping what the earlier image read (up to
    /// its sequence number `after`), with the pids it watched and the kills of them it saw.
    public static func open(after sequence: UInt64? = nil, watched: [pid_t] = [], killed: [pid_t] = []) throws(SystemError) -> KernelOOMLog {
        let fd = Glibc.open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { throw .last("open(/dev/kmsg)") }
        if sequence == nil, lseek(fd, 0, SEEK_END) < 0 {
            let error = SystemError.last("lseek(/dev/kmsg)")
            close(fd)
            throw error
        }
        return KernelOOMLog(fd: fd, after: sequence, watched: watched, killed: killed)
    }

    /// Reads what the kernel logged since the last read, noting each watched pid it killed.
    public func drain() {
        state.withLockedValue { drainLocked(&$0) }
    }

    /// Watches `pid` (just started; `drain` was called before it was forked). A record read
    /// from here on that names it is its own.
    public func watch(_ pid: pid_t) {
        state.withLockedValue { state in
            state.watched[pid] = state.overruns
            state.killed.remove(pid)
        }
    }

    /// At `pid`'s exit: whether the OOM killer killed it, the log read up to now (its record
    /// was written before the kill was sent). Nil when that cannot be known: it was not
    /// watched, or records may have gone unread since it was. It is no longer watched.
    public func take(_ pid: pid_t) -> Bool? {
        state.withLockedValue { state in
            drainLocked(&state)
            let since = state.watched.removeValue(forKey: pid)
            if state.killed.remove(pid) != nil { return true }
            guard let since, since == state.overruns else { return nil }
            return false
        }
    }

    /// `pid` is no longer watched (a process whose start failed).
    public func forget(_ pid: pid_t) {
        state.withLockedValue { state in
            state.watched.removeValue(forKey: pid)
            state.killed.remove(pid)
        }
    }

    /// What a live upgrade hands to the next image: the last record read, the pids watched
    /// with nothing unread since (one with records that may have gone unread is left out: its
    /// answer is not known there either) and those of them killed. The log is read up to now first.
    public func handover() -> (sequence: UInt64?, watched: [pid_t], killed: [pid_t]) {
        state.withLockedValue { state in
            drainLocked(&state)
            let whole = state.watched.filter { $0.value == state.overruns }.keys
            return (state.lastSequence, whole.sorted(), state.killed.sorted())
        }
    }

    private func drainLocked(_ state: inout State) {
        // A record is at most about 8 KiB with its continuation lines; a smaller buffer fails
        // its read with EINVAL.
        var buffer = [UInt8](repeating: 0, count: 16384)
        var records = 0
        while true {
            if records == recordsPerDrain {
                // The rest is read next time; a kill among it is not known to a `take` before.
                state.overruns += 1
                return
            }
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                switch errno {
                case EINTR: continue
                case EPIPE:
                    // Overwritten before read: the next read goes on from the oldest record left.
                    state.overruns += 1
                    continue
                default: return  // EAGAIN: read up to now
                }
            }
            if count == 0 { return }
            records += 1
            guard let record = KernelLogRecord.parse(String(decoding: buffer[..<count], as: UTF8.self)) else { continue }
            if let through = state.readThrough {
                if record.sequence <= through { continue }
                state.readThrough = nil
            }
            state.lastSequence = record.sequence
            if let pid = record.oomKilledPID, state.watched[pid] != nil { state.killed.insert(pid) }
        }
    }

    deinit { close(fd) }
}
