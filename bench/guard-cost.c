/* The signal guard's cost to a direct process (README, "The daemon", Signals): the filter
 * SignalGuard.swift builds, made the same way with libseccomp (mode 2; mode 1 without its
 * F_SETSIG rules; mode 0 none), loaded into this process, and three system calls timed in a loop.
 *   cc -O2 -o /tmp/guard-cost bench/guard-cost.c -lseccomp && for m in 0 1 2; do /tmp/guard-cost $m; done */
#define _GNU_SOURCE
#include <seccomp.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <signal.h>
#include <time.h>
#include <sys/stat.h>
static int rule2(scmp_filter_ctx ctx, uint32_t action, const char *name, unsigned a1, enum scmp_compare o1, uint64_t x1, uint64_t y1,
                 unsigned a2, enum scmp_compare o2, uint64_t x2, uint64_t y2) {
  int nr = seccomp_syscall_resolve_name(name); if (nr == __NR_SCMP_ERROR) return -ENOENT;
  struct scmp_arg_cmp c[2] = {{a1,o1,x1,y1},{a2,o2,x2,y2}}; return seccomp_rule_add_array(ctx, action, nr, 2, c);
}
static int rule1(scmp_filter_ctx ctx, uint32_t action, const char *name, unsigned a, uint64_t v) {
  int nr = seccomp_syscall_resolve_name(name); if (nr == __NR_SCMP_ERROR) return -ENOENT;
  struct scmp_arg_cmp c = {a, SCMP_CMP_MASKED_EQ, 0xffffffff, v}; return seccomp_rule_add_array(ctx, action, nr, 1, &c);
}
static double now(void){ struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec*1e9+t.tv_nsec; }
int stray[] = {SIGUSR1,SIGUSR2,SIGALRM,SIGVTALRM,SIGPROF,SIGIO,SIGPWR,SIGSTKFLT,SIGXCPU,SIGXFSZ};
int main(int argc, char **argv) {
  int mode = atoi(argv[1]); /* 0 none, 1 without fcntl rules, 2 with */
  pid_t sup = getppid(), grp = getpgid(sup);
  if (mode) {
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_ALLOW);
    seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0);
    seccomp_arch_add(ctx, seccomp_arch_resolve_name("x86")); seccomp_arch_add(ctx, seccomp_arch_resolve_name("x32"));
    uint32_t r = SCMP_ACT_ERRNO(EPERM);
    int targets[] = {-1, -(int)sup, -(int)grp, (int)sup};
    for (int i = 0; i < 4; i++) rule2(ctx, r, "kill", 0, SCMP_CMP_MASKED_EQ, 0xffffffff, (uint32_t)targets[i], 1, SCMP_CMP_NE, 0, 0);
    const char *n[] = {"tkill","tgkill","rt_sigqueueinfo","rt_tgsigqueueinfo"}; unsigned sa[] = {1,2,1,2};
    for (int i = 0; i < 4; i++) rule2(ctx, r, n[i], 0, SCMP_CMP_MASKED_EQ, 0xffffffff, (uint32_t)sup, sa[i], SCMP_CMP_NE, 0, 0);
    rule1(ctx, r, "pidfd_open", 0, (uint32_t)sup);
    if (mode == 2) for (int s = 1; s < SIGRTMIN; s++) { int skip = 0; for (int k = 0; k < 10; k++) if (stray[k] == s) skip = 1; if (skip) continue;
      rule2(ctx, r, "fcntl", 1, SCMP_CMP_MASKED_EQ, 0xffffffff, 10, 2, SCMP_CMP_MASKED_EQ, 0xffffffff, s);
      rule2(ctx, r, "fcntl64", 1, SCMP_CMP_MASKED_EQ, 0xffffffff, 10, 2, SCMP_CMP_MASKED_EQ, 0xffffffff, s); }
    char path[] = "/tmp/guard-cost.XXXXXX"; int fd = mkstemp(path); seccomp_export_bpf(ctx, fd); struct stat st; fstat(fd, &st); unlink(path);
    fprintf(stderr, "mode %d: %ld instructions\n", mode, (long)st.st_size / 8);
    if (seccomp_load(ctx)) { perror("load"); return 1; }
  }
  int p[2]; pipe(p); const int N = 2000000; double t;
  t = now(); for (int i = 0; i < N; i++) getppid(); printf("mode %d getppid %.1f ns\n", mode, (now()-t)/N);
  t = now(); for (int i = 0; i < N; i++) kill(getpid(), 0); printf("mode %d kill %.1f ns\n", mode, (now()-t)/N);
  t = now(); for (int i = 0; i < N; i++) fcntl(p[0], F_GETFL); printf("mode %d fcntl %.1f ns\n", mode, (now()-t)/N);
  if (mode == 2) { printf("setsig 32: %d\n", fcntl(p[0], F_SETSIG, 32)); printf("setsig 34: %d\n", fcntl(p[0], F_SETSIG, 34)); }
  return 0;
}
