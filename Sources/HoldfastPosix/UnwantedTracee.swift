import CHoldfastShims

#if canImport(Glibc)
import Glibc
#endif

/// A child that made this process its tracer, and what to do at its stop: let go of it.
///
/// Why this exists: `ptrace(PTRACE_TRACEME)` — an anti-debugging check many programs make ("is a
/// debugger attached?": it fails when one is) — makes the caller's parent its tracer, and a
/// container process's parent is the supervisor (a runc container's, once runc has gone: the
/// supervisor is the subreaper). From then on each signal it gets, and its next exec, stop it in
/// the kernel until its tracer lets it go, and waitpid reports those stops to the tracer whatever
/// its options. The reaper took such a stop for an exit (`killed by signal 0`): the host was told
/// the process had ended while it sat stopped for ever, its output cut short.
///
/// So at its first stop the process is let go (PTRACE_DETACH) with the signal it stopped for
/// handed on, and from then on it runs untraced, as it would have with a parent that never
/// traces. Its check has passed (TRACEME succeeded), and it may call it again: the next stop lets
/// go again. One exception: the SIGTRAP the kernel sends a traced process after an exec (a
/// tracer's breakpoint, sent only because it is traced) is dropped, as if untraced there was none
/// — it would kill the program (SIGTRAP's default is a core dump). The kernel sends that one as
/// the process's own kill(2); a SIGTRAP a traced process sends itself with kill(2) looks the same
/// and is dropped too (raise(3) and a breakpoint instruction are told apart and handed on).
public enum UnwantedTracee {
    /// `si_code` of a signal sent with kill(2) (the kernel's SI_USER).
    static let sentWithKill: Int32 = 0

    /// The signal to hand on when letting go of a tracee that stopped for `stopSignal`, sent as
    /// `senderCode`/`senderPID` said (nil: no siginfo, a group stop, where nothing is handed on
    /// anyway); `ownPIDs` are the tracee's pids in its pid namespaces, innermost last (the sender
    /// of a signal a process sends itself is named in the process's own namespace).
    public static func signalToHandOn(stopSignal: Int32, sender: (code: Int32, pid: pid_t)?, ownPIDs: [pid_t]) -> Int32 {
        guard stopSignal == SIGTRAP, let sender else { return stopSignal }
        let fromItself = sender.code == sentWithKill && ownPIDs.last == sender.pid
        return fromItself ? 0 : stopSignal
    }

    /// Lets go of `pid`, a tracee of this process stopped for `stopSignal`, on the spawn thread:
    /// the tracer is the thread that forked it (every child is forked there) or, for an orphan
    /// the subreaper took in, the main thread, which is the spawn thread in `holdfast`
    /// (`SpawnThread`). False when it could not: it was killed meanwhile (its exit comes next),
    /// or its tracer is another thread.
    @discardableResult
    public static func letGo(_ pid: pid_t, stoppedBy stopSignal: Int32) -> Bool {
        SpawnThread.perform { letGoHere(pid, stoppedBy: stopSignal) }
    }

    /// `letGo` for every tracee one reap found, in one trip to the spawn thread; returns how
    /// many could not be let go.
    static func letGo(_ tracees: [(pid: pid_t, signal: Int32)]) -> Int {
        SpawnThread.perform { tracees.count { !letGoHere($0.pid, stoppedBy: $0.signal) } }
    }

    private static func letGoHere(_ pid: pid_t, stoppedBy stopSignal: Int32) -> Bool {
        // Who sent it matters for SIGTRAP alone: any other signal goes on without the two
        // lookups (a process that traces itself in a loop is let go once per stop).
        guard stopSignal == SIGTRAP else { return hf_ptrace_let_go(pid, stopSignal) == 0 }
        var code: Int32 = 0
        var sender: pid_t = 0
        let known = hf_ptrace_stop_sender(pid, &code, &sender) == 0
        let signal = signalToHandOn(stopSignal: stopSignal, sender: known ? (code, sender) : nil, ownPIDs: namespacePIDs(of: pid))
        return hf_ptrace_let_go(pid, signal) == 0
    }

    /// The `NSpid:` line of /proc/PID/status: the process's pid in each of its pid namespaces,
    /// outermost first (one entry without pid namespaces).
    public static func namespacePIDs(inStatus text: String) -> [pid_t] {
        for line in text.split(separator: "\n") where line.hasPrefix("NSpid:") {
            return line.dropFirst("NSpid:".count).split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { pid_t($0) }
        }
        return []
    }

    static func namespacePIDs(of pid: pid_t) -> [pid_t] {
        guard let status = readSmallFile("/proc/\(pid)/status") else { return [pid] }
        let pids = namespacePIDs(inStatus: status)
        return pids.isEmpty ? [pid] : pids
    }
}
