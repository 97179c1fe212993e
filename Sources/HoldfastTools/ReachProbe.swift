import CHoldfastShims
import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// `holdfast reach-probe --pid PID`: what a process can do to another one — the attacks on the
/// broker that an unprivileged process in the guest would try: take its fds (`pidfd_getfd`),
/// trace it (`ptrace(PTRACE_ATTACH)`), read or write its memory (`/proc/PID/mem`), kill it.
/// Tests run it as another uid than the target's and expect every attempt refused.
public enum ReachProbe {
    public struct Attempt: Sendable, Equatable, CustomStringConvertible {
        public var name: String
        /// nil: it worked; otherwise the errno it was refused with.
        public var refusedWith: Int32?
        public var description: String { "\(name): " + (refusedWith.map { "refused, errno \($0)" } ?? "SUCCEEDED") }
    }

    /// Tries every attack on `pid` (its fds 0 to `highestFD` for `pidfd_getfd`); the kill goes
    /// last, so a success of the others is still visible.
    public static func run(pid: pid_t, highestFD: Int32 = 63) -> [Attempt] {
        var attempts: [Attempt] = []
        func record(_ name: String, _ result: Int) {
            attempts.append(Attempt(name: name, refusedWith: result >= 0 ? nil : errno))
        }
        let pidfd = hf_pidfd_open(pid)
        if pidfd < 0 {
            record("pidfd_open", -1)
        } else {
            // Every fd number of the target: a refusal must come before the fd is looked up.
            var errors: Set<Int32> = []
            var taken: [Int32] = []
            for target in 0...highestFD {
                let fd = hf_pidfd_getfd(pidfd, target)
                if fd >= 0 {
                    taken.append(target)
                    close(Int32(fd))
                } else {
                    errors.insert(errno)
                }
            }
            close(pidfd)
            if let first = taken.first {
                attempts.append(Attempt(name: "pidfd_getfd(fd \(first))", refusedWith: nil))
            } else {
                attempts.append(Attempt(name: "pidfd_getfd", refusedWith: errors.count == 1 ? errors.first! : errors.max()!))
            }
        }
        let traced = hf_ptrace_attach(pid)
        record("ptrace(PTRACE_ATTACH)", traced)
        if traced >= 0 { _ = hf_ptrace_detach(pid) }
        for (mode, name) in [(O_RDONLY, "open /proc/PID/mem for reading"), (O_WRONLY, "open /proc/PID/mem for writing")] {
            let fd = open("/proc/\(pid)/mem", mode | O_CLOEXEC)
            record(name, Int(fd))
            if fd >= 0 { close(fd) }
        }
        record("kill(0)", Int(kill(pid, 0)))
        record("kill(SIGSTOP)", Int(kill(pid, SIGSTOP)))
        record("kill(SIGKILL)", Int(kill(pid, SIGKILL)))
        return attempts
    }
}
