// The C sink again, reading the way a reactor does: the connection non-blocking and registered
// edge-triggered with epoll; read 128 KiB at a time until a read comes back short (a stream
// socket's short read took all that was queued), then epoll_wait — unless the peer hung up
// (EPOLLRDHUP seen): the end-of-file behind the last bytes brings no new edge, so reading goes on
// until it returns 0. Fed by the same relay as the
// C sink, its CPU against the C sink's is what waiting in epoll_wait instead of inside read(2)
// costs at minimum: the floor for any reactor-based receiver, Holdfast's included.
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: epoll-sink PATH\n"); return 2; }
    int listener = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    strncpy(address.sun_path, argv[1], sizeof(address.sun_path) - 1);
    unlink(argv[1]);
    if (bind(listener, (struct sockaddr *)&address, sizeof(address)) != 0) { perror("epoll-sink: bind"); return 1; }
    if (listen(listener, 1) != 0) { perror("epoll-sink: listen"); return 1; }
    int connection = accept(listener, NULL, NULL);
    if (connection < 0) { perror("epoll-sink: accept"); return 1; }
    if (fcntl(connection, F_SETFL, O_NONBLOCK) != 0) { perror("epoll-sink: fcntl"); return 1; }
    int poller = epoll_create1(0);
    struct epoll_event interest = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET};
    if (epoll_ctl(poller, EPOLL_CTL_ADD, connection, &interest) != 0) { perror("epoll-sink: epoll_ctl"); return 1; }
    static char buffer[131072];
    unsigned long long total = 0;
    int hung_up = 0;
    for (;;) {
        ssize_t got = read(connection, buffer, sizeof(buffer));
        if (got == 0) break;
        if (got < 0 && errno == EINTR) continue;
        if (got < 0 && errno != EAGAIN) { perror("epoll-sink: read"); return 1; }
        if (got > 0) total += (unsigned long long)got;
        if (got < 0 || (got < (ssize_t)sizeof(buffer) && !hung_up)) {
            struct epoll_event event;
            while (epoll_wait(poller, &event, 1, -1) < 0) {
                if (errno != EINTR) { perror("epoll-sink: epoll_wait"); return 1; }
            }
            if (event.events & (EPOLLRDHUP | EPOLLHUP)) hung_up = 1;
        }
    }
    printf("%llu\n", total);
    unlink(argv[1]);
    return 0;
}
