// The splice(2) loop again, waiting the way a reactor does: the socket non-blocking, both ends
// registered edge-triggered with epoll (the pipe for input, the socket for room), each splice
// non-blocking; splice until one comes back EAGAIN (the pipe empty or the socket full: either
// end's next edge is worth a retry), then epoll_wait. Against the blocking splice loop, what
// waiting in epoll_wait instead of inside splice(2) costs at minimum: the floor for any
// reactor-based zero-copy relay, Holdfast's raw mode included.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: epoll-splice PATH\n"); return 2; }
    int sock = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    strncpy(address.sun_path, argv[1], sizeof(address.sun_path) - 1);
    if (connect(sock, (struct sockaddr *)&address, sizeof(address)) != 0) { perror("epoll-splice: connect"); return 1; }
    if (fcntl(sock, F_SETFL, O_NONBLOCK) != 0) { perror("epoll-splice: fcntl"); return 1; }
    int poller = epoll_create1(0);
    struct epoll_event input = {.events = EPOLLIN | EPOLLET, .data.fd = 0};
    struct epoll_event room = {.events = EPOLLOUT | EPOLLET, .data.fd = sock};
    if (epoll_ctl(poller, EPOLL_CTL_ADD, 0, &input) != 0 || epoll_ctl(poller, EPOLL_CTL_ADD, sock, &room) != 0) {
        perror("epoll-splice: epoll_ctl");
        return 1;
    }
    for (;;) {
        ssize_t moved = splice(0, NULL, sock, NULL, 1 << 20, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (moved > 0) continue;
        if (moved == 0) break;
        if (errno == EINTR) continue;
        if (errno != EAGAIN) { perror("epoll-splice: splice"); return 1; }
        struct epoll_event events[2];
        while (epoll_wait(poller, events, 2, -1) < 0) {
            if (errno != EINTR) { perror("epoll-splice: epoll_wait"); return 1; }
        }
    }
    return 0;
}
