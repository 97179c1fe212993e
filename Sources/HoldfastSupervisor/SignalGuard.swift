import CSeccomp
import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// A seccomp filter every direct process starts under (`processes.signal_guard`): no signal
/// from it, or from anything it starts, reaches the supervisor. A direct process has no pid
/// namespace, so a root one can signal the supervisor like any other process, and a stop
/// (SIGTERM) ends every container. The supervisor refuses a stop or a reload from its own
/// children (`refusedAsSentByAChild`), but not from their children — the sender of an external
/// `/bin/kill $PPID` in a script, a `pkill -f daemon` or a `kill -TERM -1` is gone before the
/// supervisor could tell whose it was. The filter makes the kernel refuse them at the source,
/// with EPERM, as it refuses a process of another user:
///
/// - kill(2) to the supervisor's pid and to its process group; and, for a process started as
///   root, to -1 (every process: without a pid namespace, every container of the VM and
///   Holdfast itself). An unprivileged process's kill -1 reaches only its own uid's processes,
///   none of them Holdfast's, and goes as in any Unix;
/// - tgkill/tkill to its main thread, rt_sigqueueinfo/rt_tgsigqueueinfo to it (`kill -q`,
///   sigqueue(3)), and pidfd_open of it;
/// - fcntl(F_SETSIG) naming a signal the supervisor does not ignore (a file's owner is
///   signalled by the kernel, with no sender, when it becomes ready).
///
/// Not refused, because seccomp cannot see it: a pidfd made by opening `/proc/PID` as a
/// directory. Only a process meaning to attack does that — the guard refuses what programs do
/// by habit — and a root direct process is past the trust boundary anyway (README, "Security").
///
/// Signal 0, which sends nothing, goes through: `kill -0 $PPID`, a script's check that its
/// parent lives, answers as it did.
///
/// Nothing else changes: every other syscall, and every other target, is allowed (the kernel
/// caches the verdict of a syscall no rule names: what is left is seccomp's entry cost, about
/// 10 ns a syscall here).
/// Architectures: the native one and those the CPU also runs (i386 and x32 beside x86-64, arm
/// beside arm64), so a 32-bit `kill` is refused too. The pids are the supervisor's, which a live
/// upgrade keeps (it re-executes in place); a process outlives no other supervisor.
enum SignalGuard {
    /// The two programs, built once: one for a process started as root, one for the others.
    struct Programs: Sendable {
        let root: [UInt8]
        let unprivileged: [UInt8]

        init(protecting pid: pid_t, group: pid_t) throws(SystemError) {
            root = try SignalGuard.program(protecting: pid, group: group, everyProcess: true)
            unprivileged = try SignalGuard.program(protecting: pid, group: group, everyProcess: false)
        }

        /// The program for a process that starts as `uid`.
        func program(forUID uid: uid_t) -> [UInt8] { uid == 0 ? root : unprivileged }
    }

    /// The program, as raw `struct sock_filter` entries, for `SpawnOptions.seccompFilter`;
    /// `everyProcess`: refuse kill(-1) too.
    static func program(protecting pid: pid_t, group: pid_t, everyProcess: Bool) throws(SystemError) -> [UInt8] {
        guard let context = seccomp_init(hf_scmp_act_allow()) else { throw SystemError("seccomp_init", errno: .init(rawValue: ENOMEM)) }
        defer { seccomp_release(context) }
        // The filter is exported, not loaded here: none of libseccomp's own attributes (such as
        // no_new_privs) apply; a syscall of an architecture not in it is allowed.
        try check(seccomp_attr_set(context, SCMP_FLTATR_ACT_BADARCH, hf_scmp_act_allow()), "seccomp_attr_set(BADARCH)")
        for name in compatibleArchitectures {
            let arch = seccomp_arch_resolve_name(name)
            guard arch != 0 else { continue }
            let added = seccomp_arch_add(context, arch)
            if added != 0 && added != -EEXIST { try check(added, "seccomp_arch_add(\(name))") }
        }
        let refused = hf_scmp_act_errno(EPERM)
        // pid_t arguments compared on their low 32 bits: the kernel reads an int, whatever a raw
        // syscall leaves in the register's upper half. Signal 0 sends nothing (`kill -0 $PPID`:
        // is my parent alive?) and goes through, as it did.
        func refuse(_ name: String, target argument: UInt32, equal to: pid_t, signal signalArgument: UInt32?) throws(SystemError) {
            let value = UInt64(UInt32(bitPattern: to))
            let result: Int32
            if let signalArgument {
                // Whole: any bit set in the register refuses (a 0 with high bits set is refused
                // too, which costs nothing).
                result = hf_scmp_rule2(
                    context, refused, name, argument, SCMP_CMP_MASKED_EQ, 0xFFFF_FFFF, value, signalArgument, SCMP_CMP_NE, 0, 0)
            } else {
                result = hf_scmp_rule(context, refused, name, Int32(argument), SCMP_CMP_MASKED_EQ, 0xFFFF_FFFF, value)
            }
            // A syscall this architecture lacks (tkill on arm64) has nothing to refuse.
            if result != 0 && result != -ENOENT && result != -EDOM { try check(result, "seccomp rule \(name)") }
        }
        var killTargets: Set<pid_t> = [pid, -pid]
        if everyProcess { killTargets.insert(-1) }
        if group > 1 { killTargets.insert(-group) }
        for target in killTargets.sorted() { try refuse("kill", target: 0, equal: target, signal: 1) }
        // The argument that holds the signal: tkill(tid, sig), tgkill(tgid, tid, sig),
        // rt_sigqueueinfo(tgid, sig, info), rt_tgsigqueueinfo(tgid, tid, sig, info).
        for (name, signalArgument) in [("tkill", 1), ("tgkill", 2), ("rt_sigqueueinfo", 1), ("rt_tgsigqueueinfo", 2)] as [(String, UInt32)] {
            try refuse(name, target: 0, equal: pid, signal: signalArgument)
        }
        // A pidfd sends any signal (pidfd_send_signal), whichever fd number it has: none of it.
        try refuse("pidfd_open", target: 0, equal: pid, signal: nil)
        // The kernel signals a file's owner when it becomes ready (F_SETOWN, with O_ASYNC): the
        // supervisor as owner, and F_SETSIG naming SIGTERM, gave a stop with no sender (no kill
        // was made), SIGKILL an end. So F_SETSIG may name only what the supervisor ignores —
        // SIGIO (its default), SIGUSR1 and the other stray signals, a realtime one (what servers
        // that use it choose) — whatever the owner, and whatever fd. Up to glibc's first
        // realtime signal: 32 and 33 are glibc's own, which no process can handle, and 32 ends
        // a Swift process by its default action.
        let ignoredBySupervisor = Set(StraySignals.all)
        for signal in Int32(1)..<StraySignals.firstRealtime where !ignoredBySupervisor.contains(signal) {
            for name in ["fcntl", "fcntl64"] {
                let result = hf_scmp_rule2(
                    context, refused, name, 1, SCMP_CMP_MASKED_EQ, 0xFFFF_FFFF, UInt64(fcntlSetSignal), 2, SCMP_CMP_MASKED_EQ, 0xFFFF_FFFF,
                    UInt64(signal))
                if result != 0 && result != -ENOENT && result != -EDOM { try check(result, "seccomp rule \(name)") }
            }
        }
        // Exported through a pipe (libseccomp 2.5 writes to an fd; the program is about 1,100
        // bytes, far below a pipe's capacity).
        let pipe = try PipeEnds.make()
        defer { close(pipe.read) }
        let exported = seccomp_export_bpf(context, pipe.write)
        close(pipe.write)
        try check(exported, "seccomp_export_bpf")
        var program: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let got = buffer.withUnsafeMutableBytes { read(pipe.read, $0.baseAddress, $0.count) }
            if got < 0 && errno == EINTR { continue }
            guard got >= 0 else { throw .last("read(the exported seccomp program)") }
            if got == 0 { break }
            program += buffer[..<got]
        }
        guard !program.isEmpty, program.count % 8 == 0 else {
            throw SystemError("seccomp_export_bpf: \(program.count) bytes, not a program", errno: .init(rawValue: EINVAL))
        }
        return program
    }

    /// fcntl's F_SETSIG: 10 on every Linux architecture (glibc names it only under _GNU_SOURCE).
    static let fcntlSetSignal: Int32 = 10

    /// The architectures whose syscalls a process on this one may make.
    static var compatibleArchitectures: [String] {
        #if arch(x86_64)
        ["x86", "x32"]
        #elseif arch(arm64)
        ["arm"]
        #else
        []
        #endif
    }

    private static func check(_ result: Int32, _ operation: String) throws(SystemError) {
        guard result == 0 else { throw SystemError(operation, errno: .init(rawValue: -result)) }
    }
}
