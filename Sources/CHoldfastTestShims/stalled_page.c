#define _GNU_SOURCE
#include "CHoldfastTestShims.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

struct hft_stalled_page {
    int uffd;
    unsigned char *page;
    size_t size;
    int fd;
    size_t length;
    int writes;
    ssize_t result;
    pthread_t thread;
    int started;
};

hft_stalled_page *hft_stalled_page_create(void) {
    hft_stalled_page *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->size = (size_t)sysconf(_SC_PAGESIZE);
    p->uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
    if (p->uffd < 0) goto fail;
    struct uffdio_api api = { .api = UFFD_API };
    if (ioctl(p->uffd, UFFDIO_API, &api) != 0) goto fail;
    p->page = mmap(NULL, p->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p->page == MAP_FAILED) { p->page = NULL; goto fail; }
    struct uffdio_register reg = {
        .range = { .start = (unsigned long)p->page, .len = p->size },
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(p->uffd, UFFDIO_REGISTER, &reg) != 0) goto fail;
    return p;
fail: {
        int saved = errno;
        if (p->page) munmap(p->page, p->size);
        if (p->uffd >= 0) close(p->uffd);
        free(p);
        errno = saved;
        return NULL;
    }
}

static void *run(void *context) {
    hft_stalled_page *p = context;
    ssize_t n = p->writes ? write(p->fd, p->page, p->length) : read(p->fd, p->page, p->length);
    p->result = n < 0 ? -errno : n;
    return NULL;
}

static int start(hft_stalled_page *p, int fd, size_t length, int writes) {
    if (p->started || length > p->size) { errno = EINVAL; return -1; }
    p->fd = fd;
    p->length = length;
    p->writes = writes;
    int created = pthread_create(&p->thread, NULL, run, p);
    if (created != 0) { errno = created; return -1; }
    p->started = 1;
    return 0;
}

int hft_stalled_page_write_async(hft_stalled_page *p, int fd, size_t length) { return start(p, fd, length, 1); }

int hft_stalled_page_read_async(hft_stalled_page *p, int fd, size_t length) { return start(p, fd, length, 0); }

int hft_stalled_page_wait_fault(hft_stalled_page *p) {
    struct uffd_msg message;
    for (;;) {
        ssize_t n = read(p->uffd, &message, sizeof message);
        if (n == (ssize_t)sizeof message && message.event == UFFD_EVENT_PAGEFAULT) return 0;
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
    }
}

int hft_stalled_page_release(hft_stalled_page *p, unsigned char byte) {
    unsigned char *source = mmap(NULL, p->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (source == MAP_FAILED) return -1;
    memset(source, byte, p->size);
    struct uffdio_copy copy = {
        .dst = (unsigned long)p->page, .src = (unsigned long)source, .len = p->size, .mode = 0,
    };
    int result = ioctl(p->uffd, UFFDIO_COPY, &copy);
    int saved = errno;
    munmap(source, p->size);
    errno = saved;
    return result == 0 ? 0 : -1;
}

ssize_t hft_stalled_page_join(hft_stalled_page *p) {
    if (!p->started) return -EINVAL;
    pthread_join(p->thread, NULL);
    p->started = 0;
    return p->result;
}

const unsigned char *hft_stalled_page_bytes(const hft_stalled_page *p) { return p->page; }

void hft_stalled_page_destroy(hft_stalled_page *p) {
    if (!p) return;
    munmap(p->page, p->size);
    close(p->uffd);
    free(p);
}
