/* Guest side (test program, hostile by design): ties up an allowed
 * upstream the ways a misbehaving client and upstream can — one request
 * whose 2 GiB answer it never reads, one whose answer's head never ends,
 * and N requests the upstream accepts and never answers, their N
 * connections opened all at once (one burst of SYNs) — and holds them all
 * open. Built static by tests/tests/network.rs; used by its one boot.
 *
 *   stall IP HOST N SECONDS
 *
 * IP: the address netstack gave HOST (the test resolves it with nslookup,
 * since a static glibc cannot). Prints "stalled connected=C refused=R"
 * once every connection has been answered (or 60 s passed) and each
 * connected one has sent its request, then sleeps SECONDS holding them. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_N 256

static struct sockaddr_in addr;

static int open_socket(int nonblocking) {
    int fd = socket(AF_INET, SOCK_STREAM | (nonblocking ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) { perror("socket"); exit(1); }
    /* A small receive buffer: the stall shows sooner, as in a slow reader. */
    int small = 4096;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    return fd;
}

static void send_request(int fd, const char *host, const char *path) {
    char req[512];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", path, host);
    if (write(fd, req, n) != n) { perror("write"); exit(1); }
}

static void blocking_request(const char *host, const char *path) {
    int fd = open_socket(0);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("connect"); exit(1); }
    send_request(fd, host, path);
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: stall IP HOST N SECONDS\n"); return 2; }
    const char *host = argv[2];
    int n = atoi(argv[3]), seconds = atoi(argv[4]);
    if (n < 0 || n > MAX_N) { fprintf(stderr, "N must be 0 to %d\n", MAX_N); return 2; }
    addr.sin_family = AF_INET;
    addr.sin_port = htons(80);
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) { fprintf(stderr, "bad ip %s\n", argv[1]); return 1; }
    blocking_request(host, "/flood");
    blocking_request(host, "/nohead");
    /* The N connects at once: every SYN leaves before any answer. */
    struct pollfd fds[MAX_N];
    for (int i = 0; i < n; i++) {
        fds[i].fd = open_socket(1);
        fds[i].events = POLLOUT;
        if (connect(fds[i].fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
            perror("connect"); return 1;
        }
    }
    int connected = 0, refused = 0, pending = n;
    time_t deadline = time(NULL) + 60;
    while (pending > 0 && time(NULL) < deadline) {
        if (poll(fds, n, 1000) < 0) { perror("poll"); return 1; }
        for (int i = 0; i < n; i++) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLOUT | POLLERR | POLLHUP))) continue;
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(fds[i].fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err == 0) {
                int flags = fcntl(fds[i].fd, F_GETFL);
                fcntl(fds[i].fd, F_SETFL, flags & ~O_NONBLOCK);
                send_request(fds[i].fd, host, "/hang");
                connected++;
            } else {
                refused++;
            }
            fds[i].fd = -1;
            pending--;
        }
    }
    printf("stalled connected=%d refused=%d\n", connected, refused);
    fflush(stdout);
    sleep(seconds);
    return 0;
}
