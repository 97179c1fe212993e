import CHoldfastShims
import HoldfastBroker
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// `holdfast seccomp-probe ATTEMPT`: loads the broker's seccomp profile into this process, then
/// tries one operation, so tests can show what each rule of the profile does. Whatever the
/// attempt needs that the profile would refuse (a pty, a pipe, a page) is made before the
/// profile is loaded; only the operation itself runs under it.
public enum SeccompProbe {
    public enum Attempt: String, CaseIterable, Sendable {
        case execve, fork, ptrace, openWrite = "open-write", openRead = "open-read", socketUnix = "socket-unix"
        /// TIOCSWINSZ and TIOCGWINSZ on a pty master: what a tty stream's resize does.
        case ioctlWindowSize = "ioctl-window-size"
        /// FIONREAD on a pipe: how a resumed stream reads its window's level.
        case ioctlFionread = "ioctl-fionread"
        /// TIOCSTI on a pty master (pushes a byte into the terminal's input): below every
        /// allowed request.
        case ioctlOther = "ioctl-other"
        /// TIOCMGET on a pty master: between two allowed requests.
        case ioctlBetween = "ioctl-between"
        /// tgkill(own pid, own thread, 0) and tgkill(parent, parent, 0); kill(parent, 0).
        case tgkillSelf = "tgkill-self", tgkillOther = "tgkill-other", killOther = "kill-other"
        /// prlimit64 reading its own limit, writing it, reading the parent's.
        case prlimitReadSelf = "prlimit-read-self", prlimitWriteSelf = "prlimit-write-self", prlimitOther = "prlimit-other"
        /// sched_setaffinity(0) to its current mask; setpriority on itself (the calling thread),
        /// on the parent, on its process group.
        case schedSetaffinity = "sched-setaffinity", setpriority, setpriorityOther = "setpriority-other"
        case setpriorityGroup = "setpriority-group"
        /// bind (an abstract Unix address: no file) and listen on a socket it may create.
        case bind, listen
        /// mmap with PROT_EXEC; mprotect of a writable page to PROT_EXEC; a plain writable mmap.
        case mmapExec = "mmap-exec", mprotectExec = "mprotect-exec", mmapWritable = "mmap-writable"
        /// prctl(PR_SET_DUMPABLE, 1): the broker may not make itself dumpable again.
        case setDumpable = "set-dumpable"
    }

    /// Returns the process exit code: 0 when the operation succeeded, 1 when it was refused
    /// with an error (printed as `refused: errno N`). A killed probe never returns (SIGSYS).
    public static func run(_ attempt: Attempt, action: SeccompAction) throws -> Int32 {
        let prepared = try prepare(attempt)
        try SeccompProfile.applyBrokerProfile(action: action)
        let result = perform(attempt, prepared)
        let error = errno
        if result >= 0 {
            print("ok")
            return 0
        }
        print("refused: errno \(error)")
        return 1
    }

    /// What an attempt works on, made while everything is still allowed.
    struct Prepared {
        var fd: Int32 = -1
        var page: UnsafeMutableRawPointer?
        /// The file `open-write` creates: the probe's own (`/tmp/holdfast-seccomp-probe-PID`),
        /// so probes run at once never share one, and a test removes the one its probe made.
        var path = ""
    }

    private static func prepare(_ attempt: Attempt) throws -> Prepared {
        var prepared = Prepared()
        switch attempt {
        case .ioctlWindowSize, .ioctlOther, .ioctlBetween:
            let pty = try PseudoTerminal.open(size: WindowSize(rows: 24, columns: 80))
            prepared.fd = pty.master
        case .ioctlFionread:
            var fds: [Int32] = [0, 0]
            guard pipe(&fds) == 0 else { throw SystemError.last("pipe") }
            prepared.fd = fds[0]
        case .bind, .listen:
            prepared.fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        case .mprotectExec:
            let page = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            guard page != MAP_FAILED else { throw SystemError.last("mmap") }
            prepared.page = page
        case .openWrite:
            // Made before the profile is loaded: only the open runs under it.
            prepared.path = "/tmp/holdfast-seccomp-probe-\(getpid())"
        default:
            break
        }
        return prepared
    }

    private static func perform(_ attempt: Attempt, _ prepared: Prepared) -> Int {
        switch attempt {
        case .execve:
            return Int(execv("/bin/true", [strdup("true"), nil]))
        case .fork:
            let pid = fork()
            if pid == 0 { _exit(0) }
            return pid > 0 ? 0 : -1
        case .ptrace:
            return hf_ptrace_attach(getppid())
        case .openWrite:
            return Int(open(prepared.path, O_WRONLY | O_CREAT | O_CLOEXEC, 0o600))
        case .openRead:
            return Int(open("/proc/self/status", O_RDONLY | O_CLOEXEC))
        case .socketUnix:
            return Int(socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0))
        case .ioctlWindowSize:
            do throws(SystemError) {
                try Terminal.resize(fd: prepared.fd, to: WindowSize(rows: 33, columns: 99))
                let size = try Terminal.size(of: prepared.fd)
                return size == WindowSize(rows: 33, columns: 99) ? 0 : -1
            } catch {
                errno = error.errno.rawValue
                return -1
            }
        case .ioctlFionread:
            var count: Int32 = 0
            return Int(hf_ioctl_fionread(prepared.fd, &count))
        case .ioctlOther:
            return Int(hf_ioctl_tiocsti(prepared.fd, 0x41))
        case .ioctlBetween:
            var lines: Int32 = 0
            return Int(hf_ioctl_tiocmget(prepared.fd, &lines))
        case .tgkillSelf:
            return hf_tgkill(getpid(), hf_gettid(), 0)
        case .tgkillOther:
            return hf_tgkill(getppid(), getppid(), 0)
        case .killOther:
            return Int(kill(getppid(), 0))
        case .prlimitReadSelf:
            return hf_prlimit_nofile(0, 0)
        case .prlimitWriteSelf:
            return hf_prlimit_nofile(0, 1)
        case .prlimitOther:
            return hf_prlimit_nofile(getppid(), 0)
        case .schedSetaffinity:
            return Int(hf_sched_setaffinity_self())
        case .setpriority:
            return Int(Glibc.setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0)))
        case .setpriorityOther:
            let parent = id_t(getppid())
            return Int(Glibc.setpriority(__priority_which_t(PRIO_PROCESS.rawValue), parent, getpriority(__priority_which_t(PRIO_PROCESS.rawValue), parent)))
        case .setpriorityGroup:
            return Int(Glibc.setpriority(__priority_which_t(PRIO_PGRP.rawValue), 0, getpriority(__priority_which_t(PRIO_PGRP.rawValue), 0)))
        case .bind:
            // An abstract address ("\0holdfast-probe-PID"): nothing on disk to clean up.
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            let name = Array("holdfast-probe-\(getpid())".utf8)
            withUnsafeMutableBytes(of: &address.sun_path) { path in
                for (index, byte) in name.enumerated() { path[index + 1] = byte }
            }
            let length = socklen_t(MemoryLayout<sa_family_t>.size + 1 + name.count)
            return Int(withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(prepared.fd, $0, length) }
            })
        case .listen:
            return Int(Glibc.listen(prepared.fd, 1))
        case .mmapExec:
            let page = mmap(nil, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            return page == MAP_FAILED ? -1 : 0
        case .mprotectExec:
            return Int(mprotect(prepared.page, 4096, PROT_READ | PROT_EXEC))
        case .mmapWritable:
            let page = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            return page == MAP_FAILED ? -1 : 0
        case .setDumpable:
            return Int(hf_set_dumpable(1))
        }
    }
}
