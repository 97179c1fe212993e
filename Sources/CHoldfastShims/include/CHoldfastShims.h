// C for what Swift cannot import directly: CMSG_* macros, sockaddr_vm, ioctl request numbers,
// prctl options, and a fork+exec that only calls async-signal-safe functions in the child.
#ifndef CHOLDFAST_SHIMS_H
#define CHOLDFAST_SHIMS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/epoll.h>

// MARK: vsock

/// Fills a sockaddr_vm; returns its length.
socklen_t hf_sockaddr_vm(struct sockaddr_storage *storage, uint32_t cid, uint32_t port);
/// Reads cid/port out of a sockaddr_vm; returns 0, or -1 if the family is not AF_VSOCK.
int hf_sockaddr_vm_parse(const struct sockaddr_storage *storage, uint32_t *cid, uint32_t *port);
int hf_af_vsock(void);
uint32_t hf_vmaddr_cid_any(void);
uint32_t hf_vmaddr_cid_host(void);
uint32_t hf_vmaddr_cid_local(void);
uint32_t hf_vmaddr_port_any(void);

// MARK: SCM_RIGHTS

/// Sends `len` bytes with `nfds` descriptors attached (nfds may be 0). Returns bytes sent or -1
/// with errno. MSG_NOSIGNAL is always set.
ssize_t hf_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);

/// Receives up to `len` bytes and up to `max_fds` descriptors with MSG_CMSG_CLOEXEC. On return
/// *nfds is how many fds were stored in `fds`; *surplus how many more arrived and were closed;
/// *truncated is 1 if the kernel set MSG_CTRUNC (the surplus fds are lost in the kernel and the
/// message must be treated as an error) and *payload_truncated 1 for MSG_TRUNC. Returns bytes
/// received (0 at end-of-file) or -1 with errno.
ssize_t hf_recv_with_fds(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds,
                         int *surplus, int *truncated, int *payload_truncated, int flags);

/// recvmsg into `iov` with room for every fd a message can carry (SCM_MAX_FD, 253), taken with
/// MSG_CMSG_CLOEXEC into `fds` (which holds 253) and counted in *nfds, for the caller to close
/// where a close may wait: without a control buffer the kernel lets go of them inside the call,
/// on the calling thread. Returns bytes received or -1 with errno.
ssize_t hf_recvmsg_taking_fds(int sock, struct iovec *iov, int iovcnt, int flags, int *fds, int *nfds);

/// Peer credentials of a connected Unix socket (SO_PEERCRED). Returns 0 or -1 with errno.
int hf_peer_credentials(int sock, pid_t *pid, uid_t *uid, gid_t *gid);

// MARK: terminals and processes

int hf_set_window_size(int fd, uint16_t rows, uint16_t cols);
/// A new fd of the terminal's slave end, from its master (TIOCGPTPEER, Linux 4.13), O_NOCTTY
/// and close-on-exec; -1 with errno where the kernel cannot.
int hf_open_pty_peer(int master);
int hf_get_window_size(int fd, uint16_t *rows, uint16_t *cols);
int hf_set_child_subreaper(void);
int hf_set_no_new_privs(void);
int hf_set_pdeathsig(int sig);
int hf_pipe_size(int fd, int size);
/// fcntl(F_GETPIPE_SZ): a pipe's capacity in bytes, or -1.
int hf_pipe_capacity(int fd);
/// pipe2(O_CLOEXEC).
int hf_pipe_cloexec(int fds[2]);
/// splice(2) without offsets, SPLICE_F_NONBLOCK | SPLICE_F_MOVE: moves up to `len` bytes from
/// `in_fd` to `out_fd` inside the kernel (one of them a pipe). Returns bytes moved, 0 at the
/// source's end-of-file, or -1 with errno (EAGAIN: one side would block; EINVAL: these two fds
/// cannot be spliced).
ssize_t hf_splice(int in_fd, int out_fd, size_t len);
/// preadv2/pwritev2 at the current position with RWF_NOWAIT: a read or write that does not
/// wait whatever the file description's O_NONBLOCK says (another holder of the description can
/// clear that flag). -1 with errno: EAGAIN (would wait), EOPNOTSUPP (this file, or this kernel's
/// pipes, cannot be asked per call).
ssize_t hf_readv_nowait(int fd, const struct iovec *iov, int count);
ssize_t hf_writev_nowait(int fd, const struct iovec *iov, int count);
/// eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK).
int hf_eventfd(void);
/// accept4 with SOCK_NONBLOCK | SOCK_CLOEXEC.
int hf_accept_nonblocking(int fd);
/// Opens a pty pair (master and slave both O_CLOEXEC, O_NOCTTY); writes the slave's path into
/// `name`. Returns 0, or -1 with errno and *failed_step naming the call that failed.
int hf_open_pty(int *master, int *slave, char *name, size_t name_len, const char **failed_step);

/// pidfd_open(2): an fd that becomes readable when the process exits. -1 with errno on failure.
int hf_pidfd_open(pid_t pid);
/// pidfd_send_signal(2): a signal to the very process a pidfd names, never to a later holder
/// of its pid.
int hf_pidfd_send_signal(int pidfd, int signo);
/// waitpid wrappers that decode the status: returns the pid reaped, 0 if none, -1 with errno.
/// *exited is 1 for a normal exit (code in *code), 0 for death by signal (*code = signal), and
/// 2 for a stop of a child that made this process its tracer (PTRACE_TRACEME; *code = the stop
/// signal): not an exit, the child is still there.
pid_t hf_wait(pid_t pid, int nohang, int *exited, int *code);
/// PTRACE_GETSIGINFO of a tracee in a signal-delivery stop: the signal's si_code and sender.
/// 0, or -1 with errno (EINVAL: a group stop, which has no siginfo).
int hf_ptrace_stop_sender(pid_t pid, int *code, pid_t *sender);
/// PTRACE_DETACH, handing `signo` (0: none) on to the tracee. 0, or -1 with errno.
int hf_ptrace_let_go(pid_t pid, int signo);

/// Options for hf_spawn. Any fd may be -1 (inherit nothing on that number: /dev/null is used).
typedef struct {
    const char *path;          ///< executable; resolved with PATH when it has no '/'
    char *const *argv;
    char *const *envp;
    const char *cwd;           ///< NULL: unchanged
    int stdin_fd, stdout_fd, stderr_fd;
    int controlling_tty;       ///< 1: setsid() and make stdin (a pty slave) the controlling tty
    int new_session;           ///< 1: setsid() (implied by controlling_tty)
    int set_ids;               ///< 1: setgroups(ngroups, groups), setgid(gid), setuid(uid)
    uid_t uid;
    gid_t gid;
    const gid_t *groups;
    int ngroups;
    int pdeathsig;             ///< 0: none; else signal the child gets when its parent dies
    const int *keep_fds;       ///< extra fds the child keeps (their CLOEXEC flag is cleared)
    int nkeep_fds;
    int reset_signals;         ///< 1: default dispositions and an empty signal mask in the child
    unsigned long long nofile_soft; ///< 0: unchanged; else the child's RLIMIT_NOFILE soft limit
    unsigned long long nofile_hard; ///< 0: unchanged; else the child's RLIMIT_NOFILE hard limit
    int set_oom_score_adj;     ///< 1: write oom_score_adj into the child's /proc/self/oom_score_adj
    int oom_score_adj;
    int join_cgroup;           ///< 1: write "0" to cgroup_procs_fd first (the child joins that cgroup)
    int cgroup_procs_fd;       ///< an open cgroup.procs of a cgroup v2 directory (with join_cgroup)
    const void *seccomp_filter; ///< NULL: none; else a seccomp program (struct sock_filter entries)
    int seccomp_filter_length; ///< its number of entries (at most 4096)
} hf_spawn_options;

/// fork + exec in two steps, so that a caller can fork on one thread (the child's parent) and
/// record the child between the fork and anything that could reap it (a reaper's lock held
/// across hf_spawn_fork only), and wait for the exec on another (the child's set-up and exec can
/// block). hf_spawn_fork returns the pid (or -1) and the read end of the report pipe;
/// hf_spawn_result returns 0 once the child exec'd, or -1 with errno set to why the child could
/// not start and *failed_step naming the step (the child reports set-up and exec failures through
/// a CLOEXEC pipe, so a bad path is an error here, not a mysterious exit 127; it then exits 127
/// and is left for the caller to reap: hf_reap_failed_child, or the caller's reaper).
pid_t hf_spawn_fork(const hf_spawn_options *options, int *report_fd, const char **failed_step);
int hf_spawn_result(int report_fd, const char **failed_step);
/// The scheduling every spawned child is given back (what this process started with): read,
/// and set (a live upgrade's new image takes the first image's).
void hf_start_scheduling(int *nice_value, int *policy, int *priority, long *ioprio);
void hf_set_start_scheduling(int nice_value, int policy, int priority, long ioprio);
/// The failure a child's report carried (its errno, `failed_step` set), or 0 when `count`
/// bytes are not a whole record (none: the exec happened).
int hf_spawn_failure_decode(const void *bytes, size_t count, const char **failed_step);
/// waitpid(pid) for a child hf_spawn_result said failed, errno kept.
void hf_reap_failed_child(pid_t pid);



/// What the handler `hf_signal_to_pipe` installs writes for each signal, in one write.
typedef struct {
    int32_t signo;
    int32_t sender_pid;   ///< the process that sent it (kill, sigqueue, tkill); 0 if the kernel did
    uint32_t sender_uid;  ///< its real uid; 0 if the kernel sent it
} hf_signal_record;

/// Installs a handler for `signo` that writes an `hf_signal_record` to `fd` (a non-blocking
/// pipe): the classic self-pipe, safe with any number of threads. Each signal has its own fd
/// (the last one given for it). SA_RESTART and SA_SIGINFO are set (not SA_NOCLDSTOP). Returns 0
/// or -1 with errno.
int hf_signal_to_pipe(int signo, int fd);
/// The reader took a record of `signo` from the pipe: for SIGCHLD, the next one writes a record
/// again (one SIGCHLD record is in the pipe at a time).
void hf_signal_record_taken(int signo);
/// stdout line-buffered (stdio's FILE *stdout is not for Swift 6 to touch).
void hf_line_buffer_stdout(void);
/// How many records the `hf_signal_to_pipe` handler has written whole since the process began.
unsigned long hf_signal_records_written(void);
/// From now on the `hf_signal_to_pipe` handler writes none of `signals` into the pipe: it queues
/// each again, with its siginfo, on thread `tid` (which must block them), where it stays pending
/// (across an execve by that thread too) until that thread unblocks it.
void hf_signal_hold(pid_t tid, const int *signals, int count);
/// Ends `hf_signal_hold`: the handler writes every signal into the pipe again.
void hf_signal_release(void);
/// Installs a handler for `signo` that takes it as its default action (raised again at once)
/// when the parent process or the kernel sent it, and otherwise only writes an `hf_signal_record`
/// of it to `fd` (a non-blocking pipe) and ignores it. Returns 0 or -1 with errno.
int hf_signal_from_parent_only(int signo, int fd);
/// SIG_IGN for `signo` in this process (a child gets it too unless its spawn resets it).
int hf_ignore_signal(int signo);
/// 1 if `signo` is ignored (SIG_IGN) in this process now — as `nohup` leaves SIGHUP.
int hf_signal_is_ignored(int signo);
/// The realtime signals this libc leaves to programs (SIGRTMIN and SIGRTMAX are functions of
/// the running glibc, which keeps the first two for its threads).
int hf_sigrtmin(void);
int hf_sigrtmax(void);

/// A live upgrade's way back for a new image that dies of a fatal signal (SIGSEGV, SIGBUS,
/// SIGILL, SIGTRAP, SIGFPE, SIGABRT, SIGSYS) before it serves: the handler blocks `blocked`,
/// clears close-on-exec on `keep`, writes why into `reason_fd` (at offset 0) and executes
/// `executable` (execveat, AT_EMPTY_PATH) with copies of `argv` and the environment taken now,
/// using only async-signal-safe calls. If that exec fails the process dies of the signal, as it
/// would have. Returns 0, or -1 with errno.
int hf_fallback_arm(int executable, char *const argv[], const int *keep, int nkeep, int reason_fd, const int *blocked, int nblocked);
/// Puts back the handlers `hf_fallback_arm` replaced (the image took over: no way back).
void hf_fallback_disarm(void);

/// ptrace(PTRACE_ATTACH, pid) — only for the probes, which must be refused it.
long hf_ptrace_attach(pid_t pid);

/// prctl(PR_SET_DUMPABLE, value) / PR_GET_DUMPABLE.
int hf_set_dumpable(int value);
int hf_get_dumpable(void);

// The raw calls the probes (`holdfast seccomp-probe`, `holdfast reach-probe`) try: each returns
// what the syscall returned, -1 with errno on failure.
long hf_pidfd_getfd(int pidfd, int target_fd);
long hf_tgkill(pid_t tgid, pid_t tid, int sig);
/// prlimit64(pid, RLIMIT_NOFILE): with `set`, writes back the current limit; reads it otherwise.
long hf_prlimit_nofile(pid_t pid, int set);
/// ioctl(fd, FIONREAD, &count).
int hf_ioctl_fionread(int fd, int *count);
/// Probes of the broker's seccomp profile: requests it must refuse.
int hf_ioctl_tiocsti(int fd, char byte);
int hf_ioctl_tiocmget(int fd, int *lines);
pid_t hf_gettid(void);
/// sched_setaffinity(0) to the affinity it has now.
int hf_sched_setaffinity_self(void);
/// ptrace(PTRACE_DETACH, pid, 0, 0).
long hf_ptrace_detach(pid_t pid);

/// mallopt(M_MMAP_THRESHOLD, bytes) and M_TRIM_THRESHOLD: allocations of at least `bytes` get
/// their own mapping, returned to the system when freed. Returns 1 on success.
int hf_malloc_mmap_threshold(int bytes);

/// mallinfo2(): bytes malloc has handed out and not had back (in the heap, the arenas and
/// their own mappings), and bytes it holds free.
void hf_malloc_usage(size_t *in_use, size_t *free_bytes);

/// malloc_trim(0): gives free whole pages in every arena back to the system. Returns 1 if
/// any memory was released.
int hf_malloc_trim(void);

/// memfd_create(name, MFD_CLOEXEC): anonymous shared memory a child can inherit by fd.
int hf_memfd_create(const char *name);
#endif
