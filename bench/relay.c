// The reference relay: a plain blocking read/write loop from stdin to a Unix socket, 128 KiB at a
// time. What any relay pays at minimum for the same work.
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: relay PATH\n"); return 2; }
    int sock = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    strncpy(address.sun_path, argv[1], sizeof(address.sun_path) - 1);
    if (connect(sock, (struct sockaddr *)&address, sizeof(address)) != 0) { perror("relay: connect"); return 1; }
    static char buffer[131072];
    for (;;) {
        ssize_t got = read(0, buffer, sizeof(buffer));
        if (got < 0) { if (errno == EINTR) continue; perror("relay: read"); return 1; }
        if (got == 0) break;
        for (ssize_t done = 0; done < got;) {
            ssize_t sent = write(sock, buffer + done, (size_t)(got - done));
            if (sent < 0) { if (errno == EINTR) continue; perror("relay: write"); return 1; }
            done += sent;
        }
    }
    return 0;
}
