import CHoldfastShims
import CSeccomp
import HoldfastPosix
import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// The broker's seccomp allow-list: what a process that only moves bytes between fds it was
/// handed, dials sockets and answers a control socket needs — and nothing to start programs,
/// fork, trace, mount, open files for writing, listen, run new code or reach another process.
///
/// - `clone` only with CLONE_THREAD (threads, never processes); `clone3` fails with ENOSYS so
///   libc falls back to `clone`, whose flags a classic filter can inspect.
/// - `open`/`openat` only read-only, without O_CREAT or O_TRUNC.
/// - `socket` only for AF_UNIX, AF_INET, AF_INET6 and AF_VSOCK; no `bind` or `listen` (the
///   handoff socket arrives bound and listening from the supervisor; dials need neither).
/// - `ioctl` only TIOCSWINSZ (a tty stream's resize), TIOCGWINSZ and FIONREAD; any other request answers
///   ENOTTY, so a library's probe (isatty) gets "not a terminal" rather than killing the broker.
/// - `mmap`/`mprotect` never with PROT_EXEC: they answer EPERM (a dlopen, e.g. of an NSS module,
///   fails instead of killing the broker); no new code can be mapped.
/// - `tgkill` only to its own threads (abort() uses it); `prlimit64` only to read its own
///   limits; `setpriority` only on the calling thread (libdispatch's worker threads); no
///   `sched_setaffinity`, `kill` or `tkill`.
/// - `prctl` only the options the runtime uses; not PR_SET_DUMPABLE (the broker made itself
///   non-dumpable before loading the filter, and stays so).
///
/// Measured, not guessed: the whole test suite and the soak ran with `broker.seccomp: log` and
/// the kernel's audit log listed no call outside these rules (README, "The daemon").
public enum SeccompProfile {
    /// Syscalls allowed without conditions.
    static let allowed: [String] = [
        // I/O on fds it holds.
        "read", "readv", "pread64", "preadv2", "write", "writev", "pwrite64", "pwritev2", "sendmsg", "recvmsg", "sendto", "recvfrom",
        "sendmmsg", "recvmmsg", "splice", "close", "close_range", "dup", "dup3", "fcntl", "lseek", "fstat", "newfstatat",
        "statx", "fstatfs", "readlink", "readlinkat", "getdents64", "pipe2",
        // Sockets (domain checked below for socket()); accept4 on the handoff listener it was handed.
        "connect", "accept4", "shutdown", "getsockopt", "setsockopt", "getsockname", "getpeername", "socketpair",
        // Waiting.
        "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select",
        "pselect6", "eventfd2", "timerfd_create", "timerfd_settime", "timerfd_gettime", "futex", "futex_waitv",
        "nanosleep", "clock_nanosleep", "sched_yield", "restart_syscall",
        // Memory (mmap and mprotect below, without PROT_EXEC).
        "munmap", "mremap", "madvise", "brk", "membarrier",
        // Threads and the process itself.
        "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "gettid", "getpid", "getppid",
        "exit", "exit_group", "sched_getaffinity", "getpriority",
        "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigtimedwait", "sigaltstack",
        // A thread blocked in rt_sigsuspend re-enters it after a stop and continue (SIGSTOP,
        // a ptrace attach by strace or a debugger, a cgroup freeze): without it a stopped
        // broker died of SIGSYS when continued. Interrupted sleeps resume via restart_syscall.
        "rt_sigsuspend",
        "getrlimit", "getrusage", "times", "uname", "sysinfo",
        // Time and identity.
        "clock_gettime", "clock_getres", "gettimeofday", "time", "getuid", "geteuid", "getgid", "getegid",
        "getgroups", "getresuid", "getresgid", "getrandom", "getcwd", "access", "faccessat", "faccessat2",
        "arch_prctl",
    ]

    /// Builds the broker's filter with `action` for everything not allowed and loads it into
    /// every thread of the calling process (TSYNC). Sets no_new_privs first, which also lets an
    /// unprivileged process load a filter. Irreversible. The argument checks that name a pid
    /// name this process's.
    public static func applyBrokerProfile(action: SeccompAction) throws(SystemError) {
        guard action != .off else { return }
        guard hf_set_no_new_privs() == 0 else { throw .last("prctl(PR_SET_NO_NEW_PRIVS)") }
        let defaultAction = action == .kill ? hf_scmp_act_kill_process() : hf_scmp_act_log()
        guard let context = seccomp_init(defaultAction) else { throw SystemError("seccomp_init", errno: .init(rawValue: ENOMEM)) }
        defer { seccomp_release(context) }
        // A refusal answers with an error under `kill`; under `log` it is left to the default
        // action (allow and log), so that auditing a new build shows every call outside the rules.
        func refuse(_ name: String, with error: Int32, arg: Int32, _ op: scmp_compare, _ a: UInt64, _ b: UInt64) throws(SystemError) {
            guard action == .kill else { return }
            try check(hf_scmp_rule(context, hf_scmp_act_errno(error), name, arg, op, a, b), "seccomp rule \(name) (refused)")
        }
        // Apply to every thread that already exists (the reactor, the concurrency pool).
        try check(seccomp_attr_set(context, SCMP_FLTATR_CTL_TSYNC, 1), "seccomp_attr_set(TSYNC)")
        let allow = hf_scmp_act_allow()
        for name in allowed {
            let result = hf_scmp_rule(context, allow, name, -1, SCMP_CMP_EQ, 0, 0)
            // A syscall this kernel/architecture lacks is simply not needed.
            if result != 0 && result != -ENOENT && result != -EDOM { try check(result, "seccomp rule \(name)") }
        }
        // Threads only: clone(flags) must include CLONE_THREAD.
        try check(
            hf_scmp_rule(context, allow, "clone", 0, SCMP_CMP_MASKED_EQ, hf_clone_thread(), hf_clone_thread()),
            "seccomp rule clone")
        try check(hf_scmp_rule(context, hf_scmp_act_errno(ENOSYS), "clone3", -1, SCMP_CMP_EQ, 0, 0), "seccomp rule clone3")
        // Read-only opens: none of O_WRONLY, O_RDWR, O_CREAT, O_TRUNC.
        let writeFlags = UInt64(O_WRONLY | O_RDWR | O_CREAT | O_TRUNC)
        try check(hf_scmp_rule(context, allow, "openat", 2, SCMP_CMP_MASKED_EQ, writeFlags, 0), "seccomp rule openat")
        let openResult = hf_scmp_rule(context, allow, "open", 1, SCMP_CMP_MASKED_EQ, writeFlags, 0)
        if openResult != 0 && openResult != -ENOENT && openResult != -EDOM { try check(openResult, "seccomp rule open") }
        // Sockets of the families a stream may use.
        for family in [AF_UNIX, AF_INET, AF_INET6, AF_VSOCK] {
            try check(hf_scmp_rule(context, allow, "socket", 0, SCMP_CMP_EQ, UInt64(family), 0), "seccomp rule socket")
        }
        // ioctl: the window size (a tty stream's resize) and FIONREAD (a resumed stream's window
        // level, read once), compared whole (64 bits: the kernel keeps the low 32, so a request
        // with high bits set is refused, never let past). Other requests answer ENOTTY: a
        // filter cannot say "none of these" in one rule (one comparison per argument), so the
        // refusal covers below the lowest and above the highest allowed request, and each one
        // between them (0x5415 to 0x541A: the modem-line requests) by name.
        let requests = [hf_ioctl_tiocgwinsz(), hf_ioctl_tiocswinsz(), hf_ioctl_request_fionread()].sorted()
        for request in requests {
            try check(hf_scmp_rule(context, allow, "ioctl", 1, SCMP_CMP_EQ, request, 0), "seccomp rule ioctl")
        }
        try refuse("ioctl", with: ENOTTY, arg: 1, SCMP_CMP_LT, requests.first!, 0)
        try refuse("ioctl", with: ENOTTY, arg: 1, SCMP_CMP_GT, requests.last!, 0)
        for between in requests.first!..<requests.last! where !requests.contains(between) {
            try refuse("ioctl", with: ENOTTY, arg: 1, SCMP_CMP_EQ, between, 0)
        }
        // No executable mappings: PROT_EXEC in mmap's or mprotect's protection (argument 2).
        let exec = hf_prot_exec()
        for name in ["mmap", "mprotect"] {
            try check(hf_scmp_rule(context, allow, name, 2, SCMP_CMP_MASKED_EQ, exec, 0), "seccomp rule \(name)")
            try refuse(name, with: EPERM, arg: 2, SCMP_CMP_MASKED_EQ, exec, exec)
        }
        // Signals to its own threads only (tgkill's first argument is the thread group).
        let me = UInt64(UInt32(bitPattern: getpid()))
        try check(hf_scmp_rule(context, allow, "tgkill", 0, SCMP_CMP_EQ, me, 0), "seccomp rule tgkill")
        // Its own limits, read only: prlimit64(0 or its pid, resource, new = NULL, old).
        for pid in [0, me] {
            try check(
                hf_scmp_rule2(context, allow, "prlimit64", 0, SCMP_CMP_EQ, pid, 0, 2, SCMP_CMP_EQ, 0, 0), "seccomp rule prlimit64")
        }
        // Its own thread's nice value only: setpriority(PRIO_PROCESS, 0, nice), which Linux
        // applies to the calling thread. libdispatch sets it on a worker thread it starts for a
        // QoS class (seen once in a 2-minute soak: forbidden, it would have killed the broker).
        try check(
            hf_scmp_rule2(context, allow, "setpriority", 0, SCMP_CMP_EQ, UInt64(PRIO_PROCESS.rawValue), 0, 1, SCMP_CMP_EQ, 0, 0),
            "seccomp rule setpriority")
        // Thread names and the few prctl options the runtime uses; not PR_SET_DUMPABLE, nor
        // PR_SET_SECCOMP, nor PR_SET_NO_NEW_PRIVS reversal (impossible anyway).
        for option in [PR_SET_NAME, PR_GET_NAME, PR_GET_DUMPABLE, PR_SET_VMA] {
            try check(hf_scmp_rule(context, allow, "prctl", 0, SCMP_CMP_EQ, UInt64(option), 0), "seccomp rule prctl")
        }
        try check(seccomp_load(context), "seccomp_load")
    }

    private static func check(_ result: Int32, _ operation: String) throws(SystemError) {
        guard result == 0 else { throw SystemError(operation, errno: .init(rawValue: -result)) }
    }

    /// The Seccomp: field of /proc/PID/status (0 none, 1 strict, 2 filter).
    public static func mode(of pid: pid_t = getpid()) -> Int? {
        guard let bytes = WholeFile.read("/proc/\(pid)/status") else { return nil }
        let text = String(decoding: bytes, as: UTF8.self)
        for line in text.split(separator: "\n") where line.hasPrefix("Seccomp:") {
            return Int(line.dropFirst("Seccomp:".count).trimmingCharacters(in: " \t"))
        }
        return nil
    }
}

extension Substring {
    func trimmingCharacters(in set: String) -> String {
        String(drop { set.contains($0) }.reversed().drop { set.contains($0) }.reversed())
    }
}
