// Writes N bytes of a fixed pattern to stdout as fast as the pipe takes them: the "container".
// With a second argument, first asks the kernel for a pipe of that many bytes (F_SETPIPE_SZ), as
// the daemon does for a container's stdout.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3) { fprintf(stderr, "usage: producer BYTES [PIPE_SIZE]\n"); return 2; }
    unsigned long long total = strtoull(argv[1], NULL, 10);
    if (argc == 3 && fcntl(1, F_SETPIPE_SZ, atoi(argv[2])) < 0) { perror("producer: F_SETPIPE_SZ"); return 1; }
    static char buffer[131072];
    for (size_t i = 0; i < sizeof(buffer); i++) buffer[i] = (char)('a' + i % 26);
    while (total > 0) {
        size_t chunk = total < sizeof(buffer) ? (size_t)total : sizeof(buffer);
        ssize_t written = write(1, buffer, chunk);
        if (written < 0) { if (errno == EINTR) continue; perror("producer: write"); return 1; }
        total -= (unsigned long long)written;
    }
    return 0;
}
