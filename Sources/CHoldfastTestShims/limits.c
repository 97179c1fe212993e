#define _GNU_SOURCE
#include "CHoldfastTestShims.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

int hft_set_nofile_soft(pid_t pid, unsigned long long soft) {
    struct rlimit limit;
    if (syscall(SYS_prlimit64, pid, RLIMIT_NOFILE, NULL, &limit) != 0) return -1;
    limit.rlim_cur = (rlim_t)soft;
    return (int)syscall(SYS_prlimit64, pid, RLIMIT_NOFILE, &limit, NULL);
}
