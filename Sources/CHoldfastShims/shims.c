#define _GNU_SOURCE
#include "CHoldfastShims.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/vm_sockets.h>
#include <malloc.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

socklen_t hf_sockaddr_vm(struct sockaddr_storage *storage, uint32_t cid, uint32_t port) {
    struct sockaddr_vm *vm = (struct sockaddr_vm *)storage;
    memset(storage, 0, sizeof(*storage));
    vm->svm_family = AF_VSOCK;
    vm->svm_cid = cid;
    vm->svm_port = port;
    return sizeof(struct sockaddr_vm);
}

int hf_sockaddr_vm_parse(const struct sockaddr_storage *storage, uint32_t *cid, uint32_t *port) {
    const struct sockaddr_vm *vm = (const struct sockaddr_vm *)storage;
    if (vm->svm_family != AF_VSOCK) return -1;
    *cid = vm->svm_cid;
    *port = vm->svm_port;
    return 0;
}

int hf_af_vsock(void) { return AF_VSOCK; }
uint32_t hf_vmaddr_cid_any(void) { return VMADDR_CID_ANY; }
uint32_t hf_vmaddr_cid_host(void) { return VMADDR_CID_HOST; }
uint32_t hf_vmaddr_cid_local(void) { return 1; /* VMADDR_CID_LOCAL */ }
uint32_t hf_vmaddr_port_any(void) { return VMADDR_PORT_ANY; }

ssize_t hf_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    char *control = NULL;
    if (nfds > 0) {
        size_t space = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        control = calloc(1, space);
        if (!control) { errno = ENOMEM; return -1; }
        msg.msg_control = control;
        msg.msg_controllen = space;
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t sent;
    do {
        sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    int saved = errno;
    free(control);
    errno = saved;
    return sent;
}

ssize_t hf_recv_with_fds(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds,
                         int *surplus, int *truncated, int *payload_truncated, int flags) {
    // Room for max_fds plus a margin, so a sender that attaches a few more than allowed is seen
    // (and its surplus closed) instead of silently truncated by the kernel.
    size_t capacity = (size_t)(max_fds > 0 ? max_fds : 0) + 8;
    size_t space = CMSG_SPACE(sizeof(int) * capacity);
    char *control = calloc(1, space);
    if (!control) { errno = ENOMEM; return -1; }
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = space;
    *nfds = 0;
    *surplus = 0;
    *truncated = 0;
    *payload_truncated = 0;
    ssize_t got;
    do {
        got = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | flags);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        int saved = errno;
        free(control);
        errno = saved;
        return -1;
    }
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *received = (int *)CMSG_DATA(cmsg);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, &received[i], sizeof(int));
            if (*nfds < max_fds) {
                fds[(*nfds)++] = fd;
            } else {
                close(fd);
                (*surplus)++;
            }
        }
    }
    if (msg.msg_flags & MSG_CTRUNC) *truncated = 1;
    if (msg.msg_flags & MSG_TRUNC) *payload_truncated = 1;
    free(control);
    return got;
}

ssize_t hf_recvmsg_taking_fds(int sock, struct iovec *iov, int iovcnt, int flags, int *fds, int *nfds) {
    // Room for 253 fds and whatever else a holder of the socket may have asked the kernel to
    // attach (SO_PASSCRED, SO_PASSSEC, SO_PASSPIDFD): without it the fds that do not fit are
    // let go of inside the call, here.
    union {
        char buffer[CMSG_SPACE(sizeof(int) * 253) + 512];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {0};
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)iovcnt;
    msg.msg_control = control.buffer;
    msg.msg_controllen = sizeof(control.buffer);
    *nfds = 0;
    ssize_t got = recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC);
    if (got < 0) return got;
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET) continue;
        // SCM_RIGHTS, and SCM_PIDFD (0x04, Linux 6.5: one pidfd a message when SO_PASSPIDFD is
        // set): every fd installed here is the caller's to close.
        if (cmsg->cmsg_type != SCM_RIGHTS && cmsg->cmsg_type != 0x04) continue;
        size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *received = (int *)CMSG_DATA(cmsg);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, &received[i], sizeof(int));
            if (*nfds < 253) fds[(*nfds)++] = fd; else close(fd);
        }
    }
    return got;
}

int hf_peer_credentials(int sock, pid_t *pid, uid_t *uid, gid_t *gid) {
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return -1;
    *pid = cred.pid;
    *uid = cred.uid;
    *gid = cred.gid;
    return 0;
}

#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif

int hf_open_pty_peer(int master) { return ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC); }

int hf_set_window_size(int fd, uint16_t rows, uint16_t cols) {
    struct winsize ws = {.ws_row = rows, .ws_col = cols};
    return ioctl(fd, TIOCSWINSZ, &ws);
}

int hf_get_window_size(int fd, uint16_t *rows, uint16_t *cols) {
    struct winsize ws;
    if (ioctl(fd, TIOCGWINSZ, &ws) != 0) return -1;
    *rows = ws.ws_row;
    *cols = ws.ws_col;
    return 0;
}

int hf_set_child_subreaper(void) { return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); }
int hf_set_no_new_privs(void) { return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); }
int hf_set_pdeathsig(int sig) { return prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0); }
int hf_pipe_size(int fd, int size) { return fcntl(fd, F_SETPIPE_SZ, size); }

int hf_pipe_capacity(int fd) { return fcntl(fd, F_GETPIPE_SZ); }

int hf_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

ssize_t hf_splice(int in_fd, int out_fd, size_t len) {
    return splice(in_fd, NULL, out_fd, NULL, len, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
}

ssize_t hf_readv_nowait(int fd, const struct iovec *iov, int count) { return preadv2(fd, iov, count, -1, RWF_NOWAIT); }

ssize_t hf_writev_nowait(int fd, const struct iovec *iov, int count) { return pwritev2(fd, iov, count, -1, RWF_NOWAIT); }

int hf_eventfd(void) { return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }

int hf_accept_nonblocking(int fd) { return accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC); }

int hf_open_pty(int *master, int *slave, char *name, size_t name_len, const char **failed_step) {
    int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0) { *failed_step = "posix_openpt"; return -1; }
    if (grantpt(m) != 0) { *failed_step = "grantpt"; goto fail; }
    if (unlockpt(m) != 0) { *failed_step = "unlockpt"; goto fail; }
    if (ptsname_r(m, name, name_len) != 0) { *failed_step = "ptsname_r"; goto fail; }
    int s = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (s < 0) { *failed_step = "open(slave)"; goto fail; }
    *master = m;
    *slave = s;
    return 0;
fail:;
    int saved = errno;
    close(m);
    errno = saved;
    return -1;
}

int hf_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
int hf_pidfd_send_signal(int pidfd, int signo) { return (int)syscall(SYS_pidfd_send_signal, pidfd, signo, NULL, 0); }

pid_t hf_wait(pid_t pid, int nohang, int *exited, int *code) {
    int status = 0;
    pid_t got;
    do {
        got = waitpid(pid, &status, nohang ? WNOHANG : 0);
    } while (got < 0 && errno == EINTR);
    if (got > 0) {
        if (WIFEXITED(status)) {
            *exited = 1;
            *code = WEXITSTATUS(status);
        } else if (WIFSTOPPED(status)) {
            // Only a tracee's stops come here (no WUNTRACED): a child that made us its tracer.
            *exited = 2;
            *code = WSTOPSIG(status);
        } else {
            *exited = 0;
            *code = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
        }
    }
    return got;
}

int hf_ptrace_stop_sender(pid_t pid, int *code, pid_t *sender) {
    siginfo_t info;
    memset(&info, 0, sizeof(info));
    if (ptrace(PTRACE_GETSIGINFO, pid, 0, &info) != 0) return -1;
    *code = info.si_code;
    *sender = info.si_pid;
    return 0;
}

int hf_ptrace_let_go(pid_t pid, int signo) {
    return (int)ptrace(PTRACE_DETACH, pid, 0, (void *)(long)signo);
}

// MARK: spawn

struct spawn_failure {
    int error;
    int step;
};

static const char *const spawn_steps[] = {
    "fork", "setsid", "TIOCSCTTY", "dup2", "chdir", "setgroups", "setgid", "setuid",
    "prctl(PDEATHSIG)", "execve", "fcntl", "setrlimit(RLIMIT_NOFILE)", "joining its cgroup",
    "prctl(PR_SET_SECCOMP): the signal guard",
};

// Writes `value` (-1000…1000) to /proc/self/oom_score_adj, async-signal-safely (after fork).
static int write_oom_score_adj(int value) {
    char text[8];
    int length = 0;
    unsigned magnitude = value < 0 ? (unsigned)(-value) : (unsigned)value;
    char digits[8];
    int count = 0;
    do {
        digits[count++] = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude > 0 && count < 7);
    if (value < 0) text[length++] = '-';
    while (count > 0) text[length++] = digits[--count];
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t written = write(fd, text, (size_t)length);
    int saved = errno;
    close(fd);
    errno = saved;
    return written == length ? 0 : -1;
}

static void child_fail(int pipe_fd, int step) {
    struct spawn_failure failure = {.error = errno, .step = step};
    ssize_t ignored = write(pipe_fd, &failure, sizeof(failure));
    (void)ignored;
    _exit(127);
}

static int open_dev_null(void) { return open("/dev/null", O_RDWR | O_CLOEXEC); }

// Marks every fd from 3 up close-on-exec. The parent is a multi-threaded process whose libraries
// (and, in tests, whose other tests) may hold fds without O_CLOEXEC at the moment of the fork; a
// child must start with its three stdio fds and the ones it was given, never a copy of an
// unrelated pipe end (which would keep that pipe's reader from seeing end-of-file, or read its
// bytes). close_range(CLOSE_RANGE_CLOEXEC) needs Linux 5.11; older kernels get the fcntl loop.
static void cloexec_from_3(void) {
#ifdef SYS_close_range
    if (syscall(SYS_close_range, 3U, ~0U, 4U /* CLOSE_RANGE_CLOEXEC */) == 0) return;
#endif
    struct rlimit limit;
    long highest = 65536;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY && limit.rlim_cur < 1048576)
        highest = (long)limit.rlim_cur;
    for (long fd = 3; fd < highest; fd++) {
        int flags = fcntl((int)fd, F_GETFD);
        if (flags >= 0 && !(flags & FD_CLOEXEC)) fcntl((int)fd, F_SETFD, flags | FD_CLOEXEC);
    }
}

// In the child, first thing: closes every fd from 3 up but those in `keep` (unsorted, at
// most 64; numbers below 3 ignored). The fork copied every fd the parent had — other processes'
// stdin write ends, other creates' pipes — and close-on-exec ends them only at an exec, which a
// binary or working directory on a hung file system (or a frozen cgroup) can hold off for ever:
// meanwhile a victim's close-stdin never reached it as end-of-file, and another create's output
// never ended. Async-signal-safe. Falls back to close() one by one without close_range(2).
static void close_all_but(const int *keep, int count) {
    int sorted[64];
    int n = 0;
    for (int i = 0; i < count && n < 64; i++) {
        int fd = keep[i];
        if (fd < 3) continue;
        int at = n;
        while (at > 0 && sorted[at - 1] > fd) {
            sorted[at] = sorted[at - 1];
            at--;
        }
        if (at > 0 && sorted[at - 1] == fd) {
            for (int j = at; j < n; j++) sorted[j] = sorted[j + 1];
            continue;
        }
        sorted[at] = fd;
        n++;
    }
    unsigned int from = 3;
    for (int i = 0; i <= n; i++) {
        unsigned int to = i < n ? (unsigned int)sorted[i] - 1 : ~0U;
        if (to != ~0U && to < from) {
            from = (unsigned int)sorted[i] + 1;
            continue;
        }
#ifdef SYS_close_range
        if (syscall(SYS_close_range, from, to, 0U) != 0)
#endif
        {
            struct rlimit limit;
            long highest = 65536;
            if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY && limit.rlim_cur < 1048576)
                highest = (long)limit.rlim_cur;
            long last = to == ~0U ? highest - 1 : (long)to;
            for (long fd = from; fd <= last; fd++) {
                if (fcntl((int)fd, F_GETFD) >= 0) close((int)fd);
            }
        }
        if (i < n) from = (unsigned int)sorted[i] + 1;
    }
}

// How this process was scheduled when it started (its nice value, policy and I/O priority),
// read before main: what every child is given back. The forks happen on one thread (the
// spawn thread, the main one), and a child inherits that thread's scheduling: an operator's
// `renice -n 10 -p PID` or `chrt -f -p 50 PID` of the daemon (which changes that thread only)
// went to every container started after it — a real-time container could starve the VM, and a
// restarted broker ran at nice 19. The daemon's own start values (a unit's Nice=, say) are
// inherited as before.
static int start_nice = 0;
static int start_policy = -1;
static struct sched_param start_param;
static long start_ioprio = -1;

// Linux's SCHED_RESET_ON_FORK, ORed into a policy (sched.h has it only under _GNU_SOURCE).
#define HF_SCHED_RESET_ON_FORK 0x40000000

__attribute__((constructor)) static void record_start_scheduling(void) {
    errno = 0;
    int nice_value = getpriority(PRIO_PROCESS, 0);
    if (errno == 0) start_nice = nice_value;
    start_policy = sched_getscheduler(0);
    if (start_policy >= 0 && sched_getparam(0, &start_param) != 0) start_policy = -1;
    if (start_policy >= 0 && (start_policy & HF_SCHED_RESET_ON_FORK)) {
        // What the kernel gives a child at fork then (a unit's CPUSchedulingResetOnFork=yes):
        // the normal policy, a nice value not below 0. Restored as read, the flag and a
        // real-time policy went back onto every container.
        start_policy = SCHED_OTHER;
        start_param.sched_priority = 0;
        if (start_nice < 0) start_nice = 0;
    }
#ifdef SYS_ioprio_get
    start_ioprio = syscall(SYS_ioprio_get, 1 /* IOPRIO_WHO_PROCESS */, 0);
#endif
}

void hf_start_scheduling(int *nice_value, int *policy, int *priority, long *ioprio) {
    *nice_value = start_nice;
    *policy = start_policy;
    *priority = start_param.sched_priority;
    *ioprio = start_ioprio;
}

// A live upgrade's new image: the values the first image started with (this image's
// constructor read them from the thread that exec'd it, which an operator may have reniced).
void hf_set_start_scheduling(int nice_value, int policy, int priority, long ioprio) {
    start_nice = nice_value;
    start_policy = policy;
    start_param.sched_priority = priority;
    start_ioprio = ioprio;
}

// In the child: back to the start values (best effort: lowering a nice value or leaving a
// real-time policy is refused without CAP_SYS_NICE; the child then keeps the parent's).
static void restore_start_scheduling(void) {
    if (start_policy >= 0) (void)sched_setscheduler(0, start_policy, &start_param);
    (void)setpriority(PRIO_PROCESS, 0, start_nice);
#ifdef SYS_ioprio_set
    if (start_ioprio >= 0) (void)syscall(SYS_ioprio_set, 1 /* IOPRIO_WHO_PROCESS */, 0, (int)start_ioprio);
#endif
}

void hf_reap_failed_child(pid_t pid) {
    int saved = errno;
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    errno = saved;
}

pid_t hf_spawn_fork(const hf_spawn_options *o, int *report_fd, const char **failed_step) {
    int report[2];
    if (pipe2(report, O_CLOEXEC) != 0) {
        if (failed_step) *failed_step = "pipe";
        return -1;
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        int saved = errno;
        close(report[0]);
        close(report[1]);
        if (failed_step) *failed_step = spawn_steps[0];
        errno = saved;
        return -1;
    }
    if (pid == 0) {
        // Child: async-signal-safe calls only.
        // Only what the child needs stays open: nothing from here on (the cgroup's freezer
        // included) may keep another process's pipes open through this copy of our fd table.
        {
            int keep[64];
            int n = 0;
            keep[n++] = report[1];
            keep[n++] = o->stdin_fd;
            keep[n++] = o->stdout_fd;
            keep[n++] = o->stderr_fd;
            if (o->join_cgroup) keep[n++] = o->cgroup_procs_fd;
            if (o->nkeep_fds > 64 - n) {
                errno = EMFILE;
                child_fail(report[1], 10);
            }
            for (int i = 0; i < o->nkeep_fds; i++) keep[n++] = o->keep_fds[i];
            close_all_but(keep, n);
        }
        // The cgroup first: whatever the child starts from here on is born inside it, so a
        // kill of the cgroup reaches every descendant, however it left the process group.
        if (o->join_cgroup && write(o->cgroup_procs_fd, "0", 1) != 1) child_fail(report[1], 12);
        restore_start_scheduling();
        if (o->reset_signals) {
            sigset_t empty;
            sigemptyset(&empty);
            for (int sig = 1; sig < NSIG; sig++) {
                if (sig == SIGKILL || sig == SIGSTOP) continue;
                signal(sig, SIG_DFL);
            }
            sigprocmask(SIG_SETMASK, &empty, NULL);
        }
        if ((o->new_session || o->controlling_tty) && setsid() < 0) child_fail(report[1], 1);
        int fds[3] = {o->stdin_fd, o->stdout_fd, o->stderr_fd};
        // Move the sources above 2 first, so dup2 onto 0..2 never clobbers a source still needed.
        for (int i = 0; i < 3; i++) {
            if (fds[i] < 0) {
                fds[i] = open_dev_null();
                if (fds[i] < 0) child_fail(report[1], 3);
            }
            if (fds[i] <= 2) {
                int moved = fcntl(fds[i], F_DUPFD_CLOEXEC, 3);
                if (moved < 0) child_fail(report[1], 3);
                fds[i] = moved;
            }
        }
        for (int i = 0; i < 3; i++) {
            if (dup2(fds[i], i) < 0) child_fail(report[1], 3);
        }
        if (o->controlling_tty && ioctl(0, TIOCSCTTY, 0) != 0) child_fail(report[1], 2);
        cloexec_from_3();
        for (int i = 0; i < o->nkeep_fds; i++) {
            int flags = fcntl(o->keep_fds[i], F_GETFD);
            if (flags < 0 || fcntl(o->keep_fds[i], F_SETFD, flags & ~FD_CLOEXEC) < 0) child_fail(report[1], 10);
        }
        // The OOM score adjustment: before the id change (lowering it takes a privilege), and
        // before the limit on open files drops (its open needs a free fd number under the new
        // limit, and the parent's fds are all still open here). Best effort: where the kernel
        // refuses (no CAP_SYS_RESOURCE: a container), the child keeps ours.
        if (o->set_oom_score_adj) (void)write_oom_score_adj(o->oom_score_adj);
        // After the close-on-exec pass, which the parent's (higher) limit bounds.
        if (o->nofile_soft || o->nofile_hard) {
            struct rlimit limit;
            if (getrlimit(RLIMIT_NOFILE, &limit) != 0) child_fail(report[1], 11);
            if (o->nofile_hard) limit.rlim_max = (rlim_t)o->nofile_hard;
            if (o->nofile_soft) limit.rlim_cur = (rlim_t)o->nofile_soft;
            if (limit.rlim_cur > limit.rlim_max) limit.rlim_cur = limit.rlim_max;
            if (setrlimit(RLIMIT_NOFILE, &limit) != 0) child_fail(report[1], 11);
        }
        // A seccomp filter the caller built (a program of sock_filter entries): before the id
        // change, while the child may still install one without no_new_privs (CAP_SYS_ADMIN),
        // which would stop setuid programs in it from working.
        if (o->seccomp_filter && o->seccomp_filter_length > 0) {
            struct sock_fprog program = {
                .len = (unsigned short)o->seccomp_filter_length,
                .filter = (struct sock_filter *)o->seccomp_filter,
            };
            if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program, 0, 0) != 0) child_fail(report[1], 13);
        }
        if (o->set_ids) {
            if (setgroups((size_t)o->ngroups, o->groups) != 0) child_fail(report[1], 5);
            if (setgid(o->gid) != 0) child_fail(report[1], 6);
            if (setuid(o->uid) != 0) child_fail(report[1], 7);
        }
        // As the process's own user: entered as root, a symlink the user planted led it into a
        // directory under one it may not enter (/root/app), and a working directory it could
        // not enter at all was accepted.
        if (o->cwd && chdir(o->cwd) != 0) child_fail(report[1], 4);
        // After the id change, which would clear it; and if the parent is already gone, act now.
        if (o->pdeathsig) {
            if (prctl(PR_SET_PDEATHSIG, o->pdeathsig, 0, 0, 0) != 0) child_fail(report[1], 8);
            if (getppid() != parent) _exit(128 + o->pdeathsig);
        }
        if (strchr(o->path, '/')) {
            execve(o->path, o->argv, o->envp);
        } else {
            execvpe(o->path, o->argv, o->envp);
        }
        child_fail(report[1], 9);
    }
    close(report[1]);
    *report_fd = report[0];
    return pid;
}

int hf_spawn_result(int report_fd, const char **failed_step) {
    struct spawn_failure failure;
    ssize_t got;
    do {
        got = read(report_fd, &failure, sizeof(failure));
    } while (got < 0 && errno == EINTR);
    close(report_fd);
    if (got == (ssize_t)sizeof(failure)) {
        if (failed_step) *failed_step = spawn_steps[failure.step];
        errno = failure.error;
        return -1;
    }
    return 0;
}

int hf_spawn_failure_decode(const void *bytes, size_t count, const char **failed_step) {
    struct spawn_failure failure;
    if (count != sizeof(failure)) return 0;
    memcpy(&failure, bytes, sizeof(failure));
    if (failed_step) *failed_step = spawn_steps[failure.step];
    return failure.error;
}

int hf_malloc_mmap_threshold(int bytes) {
    return mallopt(M_MMAP_THRESHOLD, bytes) && mallopt(M_TRIM_THRESHOLD, bytes);
}

void hf_malloc_usage(size_t *in_use, size_t *free_bytes) {
    struct mallinfo2 info = mallinfo2();
    if (in_use) *in_use = info.uordblks + info.hblkhd;
    if (free_bytes) *free_bytes = info.fordblks;
}

int hf_malloc_trim(void) {
    return malloc_trim(0);
}

int hf_memfd_create(const char *name) {
    return memfd_create(name, MFD_CLOEXEC);
}

// Each signal's pipe (the fd + 1; 0: none), so that a process may route different signals to
// different pipes (a client's SIGINT/SIGTERM/SIGHUP to one, its SIGWINCH to another). One fd for
// all, a second pipe took the first's signals: a terminal client's SIGTERM was read as a resize.
static int signal_pipe_fds[65];
// Records the handler wrote whole (a full pipe drops one): a live upgrade waits until the
// signal loop has handled this many before it commits to its exec (hf_signal_records_written).
static unsigned long signal_records_written = 0;

// While a live upgrade commits to its exec: the signals (a bit each) the handler leaves pending
// on one thread (held_tid, which blocks them) instead of writing them into the pipe.
static unsigned long held_mask = 0;
static pid_t held_tid = 0;

// 1 while a SIGCHLD record is in the pipe unread: further SIGCHLDs write none (a reaper loops on
// waitpid, so one record stands for any number of exits). A record per exit let a flood of
// exiting children (orphans reparented to us, CLONE_PARENT loops) fill the pipe, and the full
// pipe dropped the next record: `systemctl stop`'s SIGTERM, lost without a word.
static int sigchld_unread = 0;

void hf_signal_record_taken(int signo) {
    if (signo == SIGCHLD) __atomic_store_n(&sigchld_unread, 0, __ATOMIC_RELEASE);
}

static void signal_to_pipe_handler(int signo, siginfo_t *info, void *context) {
    (void)context;
    int saved = errno;
    if (signo > 0 && signo < 64 && (__atomic_load_n(&held_mask, __ATOMIC_ACQUIRE) & (1UL << signo))) {
        // Queued again on the holding thread with its sender, so that whichever image unblocks
        // it judges it as sent (a child's `kill $PPID` stays refused). As SI_QUEUE: the kernel
        // lets a thread queue a kill()'s own code (SI_USER) only to itself, not to another
        // thread (EPERM), and the pipe's record keeps a sender for any code <= 0.
        pid_t tid = __atomic_load_n(&held_tid, __ATOMIC_ACQUIRE);
        if (tid > 0) {
            siginfo_t again;
            memset(&again, 0, sizeof(again));
            again.si_signo = signo;
            again.si_code = SI_QUEUE;
            if (info != NULL && info->si_code <= 0) {
                again.si_pid = info->si_pid;
                again.si_uid = info->si_uid;
            }
            if (syscall(SYS_rt_tgsigqueueinfo, getpid(), tid, signo, &again) == 0 || syscall(SYS_tgkill, getpid(), tid, signo) == 0) {
                errno = saved;
                return;
            }
        }
    }
    if (signo == SIGCHLD && __atomic_exchange_n(&sigchld_unread, 1, __ATOMIC_ACQ_REL) == 1) {
        errno = saved;
        return;
    }
    // One write of a whole record (well under PIPE_BUF): never split, never interleaved with
    // another handler's.
    hf_signal_record record = {signo, 0, 0};
    if (info != NULL && info->si_code <= 0) {  // SI_USER, SI_QUEUE, SI_TKILL: a process sent it
        record.sender_pid = info->si_pid;
        record.sender_uid = info->si_uid;
    }
    int fd = (signo > 0 && signo < 65) ? __atomic_load_n(&signal_pipe_fds[signo], __ATOMIC_ACQUIRE) - 1 : -1;
    if (fd >= 0 && write(fd, &record, sizeof(record)) == (ssize_t)sizeof(record)) {
        __atomic_fetch_add(&signal_records_written, 1, __ATOMIC_RELEASE);
    } else if (signo == SIGCHLD) {
        // Not in the pipe: the next SIGCHLD tries again.
        __atomic_store_n(&sigchld_unread, 0, __ATOMIC_RELEASE);
    }
    errno = saved;
}

// SA_RESTART | SA_SIGINFO, nothing else blocked while it runs. No SA_NOCLDSTOP: it also silences
// a tracee's stops (a child that made this process its tracer with PTRACE_TRACEME), which must
// be let go at once (UnwantedTracee.swift). A child's ordinary stop or continue costs one waitpid
// that finds nothing.
static int install_siginfo_handler(int signo, void (*handler)(int, siginfo_t *, void *)) {
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART | SA_SIGINFO;
    return sigaction(signo, &action, NULL);
}

int hf_signal_to_pipe(int signo, int fd) {
    // A new pipe for SIGCHLD: a record left unread in one given up must not silence this one.
    if (signo == SIGCHLD) __atomic_store_n(&sigchld_unread, 0, __ATOMIC_RELEASE);
    if (signo <= 0 || signo >= 65) {
        errno = EINVAL;
        return -1;
    }
    __atomic_store_n(&signal_pipe_fds[signo], fd + 1, __ATOMIC_RELEASE);
    return install_siginfo_handler(signo, signal_to_pipe_handler);
}

static int parent_only_pipe_fd = -1;

static void parent_only_handler(int signo, siginfo_t *info, void *context) {
    (void)context;
    int saved = errno;
    // The kernel's own (si_code > 0) or the parent's: what it asks, the default action, at once
    // (the signal is blocked inside its handler: raised here, it is taken as the handler returns).
    if (info == NULL || info->si_code > 0 || info->si_pid == getppid()) {
        signal(signo, SIG_DFL);
        raise(signo);
        errno = saved;
        return;
    }
    hf_signal_record record = {signo, info->si_pid, info->si_uid};
    (void)!write(parent_only_pipe_fd, &record, sizeof(record));
    errno = saved;
}

int hf_signal_from_parent_only(int signo, int fd) {
    parent_only_pipe_fd = fd;
    return install_siginfo_handler(signo, parent_only_handler);
}

void hf_signal_hold(pid_t tid, const int *signals, int count) {
    unsigned long mask = 0;
    for (int i = 0; i < count; i++) {
        if (signals[i] > 0 && signals[i] < 64) mask |= 1UL << signals[i];
    }
    __atomic_store_n(&held_tid, tid, __ATOMIC_RELEASE);
    __atomic_store_n(&held_mask, mask, __ATOMIC_RELEASE);
}

void hf_signal_release(void) {
    __atomic_store_n(&held_mask, 0UL, __ATOMIC_RELEASE);
    __atomic_store_n(&held_tid, 0, __ATOMIC_RELEASE);
}

unsigned long hf_signal_records_written(void) {
    return __atomic_load_n(&signal_records_written, __ATOMIC_ACQUIRE);
}

int hf_sigrtmin(void) { return SIGRTMIN; }

int hf_sigrtmax(void) { return SIGRTMAX; }

int hf_signal_is_ignored(int signo) {
    struct sigaction current;
    if (sigaction(signo, NULL, &current) != 0) return 0;
    return !(current.sa_flags & SA_SIGINFO) && current.sa_handler == SIG_IGN;
}

int hf_ignore_signal(int signo) {
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = SIG_IGN;
    return sigaction(signo, &action, NULL);
}

static const int fallback_signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGTRAP, SIGFPE, SIGABRT, SIGSYS};
#define FALLBACK_SIGNAL_COUNT ((int)(sizeof(fallback_signals) / sizeof(fallback_signals[0])))

static struct {
    int executable;
    char **argv;
    char **envp;
    int *keep;
    int nkeep;
    int reason_fd;
    sigset_t blocked;
    struct sigaction replaced[FALLBACK_SIGNAL_COUNT];
    volatile sig_atomic_t armed;
} fallback;

static char **copy_strings(char *const strings[]) {
    int count = 0;
    while (strings[count] != NULL) count++;
    char **copy = calloc((size_t)count + 1, sizeof(char *));
    if (copy == NULL) return NULL;
    for (int i = 0; i < count; i++) {
        copy[i] = strdup(strings[i]);
        if (copy[i] == NULL) return NULL;
    }
    return copy;
}

static void fallback_handler(int signo) {
    // The mask survives the exec: exactly the stop signals blocked, for the previous image to
    // receive, and not the fatal ones this handler runs with blocked.
    sigprocmask(SIG_SETMASK, &fallback.blocked, NULL);
    for (int i = 0; i < fallback.nkeep; i++) fcntl(fallback.keep[i], F_SETFD, 0);
    char text[96];
    const char *prefix = "the new image was killed by signal ";
    size_t length = 0;
    while (prefix[length] != 0 && length < sizeof(text)) { text[length] = prefix[length]; length++; }
    char digits[8];
    int count = 0;
    int value = signo;
    do { digits[count++] = (char)('0' + value % 10); value /= 10; } while (value > 0 && count < 8);
    while (count > 0 && length < sizeof(text)) text[length++] = digits[--count];
    const char *suffix = " before it served (a crash)";
    for (size_t i = 0; suffix[i] != 0 && length < sizeof(text); i++) text[length++] = suffix[i];
    if (pwrite(fallback.reason_fd, text, length, 0) < 0) { /* the previous image says it did not say why */ }
    syscall(SYS_execveat, fallback.executable, "", fallback.argv, fallback.envp, AT_EMPTY_PATH);
    // No way back: die of the signal, as without this handler.
    struct sigaction original;
    memset(&original, 0, sizeof(original));
    original.sa_handler = SIG_DFL;
    sigemptyset(&original.sa_mask);
    sigaction(signo, &original, NULL);
    sigset_t one;
    sigemptyset(&one);
    sigaddset(&one, signo);
    sigprocmask(SIG_UNBLOCK, &one, NULL);
    raise(signo);
}

int hf_fallback_arm(int executable, char *const argv[], const int *keep, int nkeep, int reason_fd, const int *blocked, int nblocked) {
    extern char **environ;
    if (fallback.armed) hf_fallback_disarm();
    fallback.executable = executable;
    fallback.reason_fd = reason_fd;
    fallback.argv = copy_strings(argv);
    fallback.envp = copy_strings(environ);
    fallback.keep = malloc(sizeof(int) * (size_t)(nkeep > 0 ? nkeep : 1));
    if (fallback.argv == NULL || fallback.envp == NULL || fallback.keep == NULL) { errno = ENOMEM; return -1; }
    memcpy(fallback.keep, keep, sizeof(int) * (size_t)nkeep);
    fallback.nkeep = nkeep;
    sigemptyset(&fallback.blocked);
    for (int i = 0; i < nblocked; i++) sigaddset(&fallback.blocked, blocked[i]);
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = fallback_handler;
    sigemptyset(&action.sa_mask);
    for (int i = 0; i < FALLBACK_SIGNAL_COUNT; i++) sigaddset(&action.sa_mask, fallback_signals[i]);
    for (int i = 0; i < FALLBACK_SIGNAL_COUNT; i++) {
        if (sigaction(fallback_signals[i], &action, &fallback.replaced[i]) != 0) return -1;
    }
    fallback.armed = 1;
    return 0;
}

void hf_fallback_disarm(void) {
    if (!fallback.armed) return;
    for (int i = 0; i < FALLBACK_SIGNAL_COUNT; i++) sigaction(fallback_signals[i], &fallback.replaced[i], NULL);
    fallback.armed = 0;
    // The copies stay: a handler already running on another thread may still read them.
}

#include <sys/ptrace.h>
long hf_ptrace_attach(pid_t pid) { return ptrace(PTRACE_ATTACH, pid, NULL, NULL); }

int hf_set_dumpable(int value) { return prctl(PR_SET_DUMPABLE, value, 0, 0, 0); }
int hf_get_dumpable(void) { return prctl(PR_GET_DUMPABLE, 0, 0, 0, 0); }

#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
long hf_pidfd_getfd(int pidfd, int target_fd) { return syscall(SYS_pidfd_getfd, pidfd, target_fd, 0); }
long hf_tgkill(pid_t tgid, pid_t tid, int sig) { return syscall(SYS_tgkill, tgid, tid, sig); }

#include <sys/resource.h>
long hf_prlimit_nofile(pid_t pid, int set) {
    struct rlimit current;
    if (syscall(SYS_prlimit64, pid, RLIMIT_NOFILE, NULL, &current) != 0) return -1;
    if (!set) return 0;
    return syscall(SYS_prlimit64, pid, RLIMIT_NOFILE, &current, NULL);
}

int hf_ioctl_fionread(int fd, int *count) { return ioctl(fd, FIONREAD, count); }
int hf_ioctl_tiocsti(int fd, char byte) { return ioctl(fd, TIOCSTI, &byte); }
int hf_ioctl_tiocmget(int fd, int *lines) { return ioctl(fd, TIOCMGET, lines); }
long hf_ptrace_detach(pid_t pid) { return ptrace(PTRACE_DETACH, pid, NULL, NULL); }

pid_t hf_gettid(void) { return (pid_t)syscall(SYS_gettid); }

#include <sched.h>
int hf_sched_setaffinity_self(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return -1;
    return sched_setaffinity(0, sizeof(set), &set);
}

void hf_line_buffer_stdout(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
}
