#include <seccomp.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <termios.h>
#include <linux/vm_sockets.h>

#ifndef CLONE_THREAD
#define CLONE_THREAD 0x00010000
#endif
static inline uint64_t hf_clone_thread(void) { return CLONE_THREAD; }

// Swift cannot import these function-like macros.
static inline uint32_t hf_scmp_act_errno(int error) { return SCMP_ACT_ERRNO(error); }
static inline uint32_t hf_scmp_act_kill_process(void) { return SCMP_ACT_KILL_PROCESS; }
static inline uint32_t hf_scmp_act_log(void) { return SCMP_ACT_LOG; }
static inline uint32_t hf_scmp_act_allow(void) { return SCMP_ACT_ALLOW; }
static inline uint32_t hf_scmp_act_trap(void) { return SCMP_ACT_TRAP; }

// ioctl requests and mmap protections the broker's rules name.
static inline uint64_t hf_ioctl_tiocswinsz(void) { return TIOCSWINSZ; }
static inline uint64_t hf_ioctl_tiocgwinsz(void) { return TIOCGWINSZ; }
static inline uint64_t hf_ioctl_request_fionread(void) { return FIONREAD; }
static inline uint64_t hf_prot_exec(void) { return PROT_EXEC; }

/// Adds `action` for syscall `name` with up to one argument comparison (arg < 0: none).
/// Returns 0 or a negative errno (e.g. -EDOM when the syscall does not exist here).
static inline int hf_scmp_rule(scmp_filter_ctx ctx, uint32_t action, const char *name, int arg,
                               enum scmp_compare op, uint64_t a, uint64_t b) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) return -ENOENT;
    if (arg < 0) return seccomp_rule_add(ctx, action, nr, 0);
    struct scmp_arg_cmp cmp = {.arg = (unsigned)arg, .op = op, .datum_a = a, .datum_b = b};
    return seccomp_rule_add_array(ctx, action, nr, 1, &cmp);
}

/// Adds `action` for syscall `name` when two argument comparisons both hold.
static inline int hf_scmp_rule2(scmp_filter_ctx ctx, uint32_t action, const char *name,
                                unsigned arg1, enum scmp_compare op1, uint64_t a1, uint64_t b1,
                                unsigned arg2, enum scmp_compare op2, uint64_t a2, uint64_t b2) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) return -ENOENT;
    struct scmp_arg_cmp cmp[2] = {
        {.arg = arg1, .op = op1, .datum_a = a1, .datum_b = b1},
        {.arg = arg2, .op = op2, .datum_a = a2, .datum_b = b2},
    };
    return seccomp_rule_add_array(ctx, action, nr, 2, cmp);
}
