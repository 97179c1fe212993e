// Listens on a Unix socket, accepts one connection, reads it to end-of-file and prints the byte
// count: the "host".
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: sink PATH\n"); return 2; }
    int listener = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    strncpy(address.sun_path, argv[1], sizeof(address.sun_path) - 1);
    unlink(argv[1]);
    if (bind(listener, (struct sockaddr *)&address, sizeof(address)) != 0) { perror("sink: bind"); return 1; }
    if (listen(listener, 1) != 0) { perror("sink: listen"); return 1; }
    int connection = accept(listener, NULL, NULL);
    if (connection < 0) { perror("sink: accept"); return 1; }
    static char buffer[131072];
    unsigned long long total = 0;
    for (;;) {
        ssize_t got = read(connection, buffer, sizeof(buffer));
        if (got < 0) { if (errno == EINTR) continue; perror("sink: read"); return 1; }
        if (got == 0) break;
        total += (unsigned long long)got;
    }
    printf("%llu\n", total);
    unlink(argv[1]);
    return 0;
}
