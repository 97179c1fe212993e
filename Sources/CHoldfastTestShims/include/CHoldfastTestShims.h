#ifndef CHOLDFAST_TEST_SHIMS_H
#define CHOLDFAST_TEST_SHIMS_H

#include <stddef.h>
#include <sys/types.h>

/// Test-only adversaries (never linked into what ships): what a hostile guest process can do
/// to the kernel objects Holdfast shares with it, written in C because Swift cannot call the
/// variadic ioctl(2) that userfaultfd needs.
///
/// A stalled page: one page of memory registered with userfaultfd, whose first touch — also by
/// the kernel, copying a read(2)'s or write(2)'s bytes — waits until the page is released. A
/// pipe write from it holds the pipe's lock all that time (as a write from a hung FUSE file's
/// mapping would). Kernel-mode faults need CAP_SYS_PTRACE unless vm.unprivileged_userfaultfd=1.
typedef struct hft_stalled_page hft_stalled_page;

/// Maps and registers the page; NULL with errno set on failure.
hft_stalled_page *hft_stalled_page_create(void);

/// Starts a thread that writes `length` (at most a page) bytes from the page to `fd`.
int hft_stalled_page_write_async(hft_stalled_page *page, int fd, size_t length);

/// Starts a thread that reads up to `length` (at most a page) bytes from `fd` into the page.
int hft_stalled_page_read_async(hft_stalled_page *page, int fd, size_t length);

/// Waits until the thread's syscall touches the page (it is then inside the kernel, holding
/// whatever lock it took first). 0, or -1 with errno set.
int hft_stalled_page_wait_fault(hft_stalled_page *page);

/// Lets the syscall go on: the page is filled with `byte` (a write then sends those bytes).
int hft_stalled_page_release(hft_stalled_page *page, unsigned char byte);

/// Waits for the thread; returns its syscall's result (-errno on failure). When it read, the
/// bytes are at `hft_stalled_page_bytes`.
ssize_t hft_stalled_page_join(hft_stalled_page *page);

const unsigned char *hft_stalled_page_bytes(const hft_stalled_page *page);

/// Unmaps and frees (after join).
void hft_stalled_page_destroy(hft_stalled_page *page);

/// Sets another process's soft limit on open files (its hard limit kept): an operator's
/// `prlimit --pid PID --nofile=N:`, which the test needs to run a daemon out of fds for a moment.
/// 0, or -1 with errno. Swift cannot import glibc's prlimit (a GNU extension).
int hft_set_nofile_soft(pid_t pid, unsigned long long soft);

#endif
