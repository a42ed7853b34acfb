/* Guest side (test program, hostile by design): ties up an allowed
 * upstream the ways a misbehaving client and upstream can — one request
 * whose 2 GiB answer it never reads, one whose answer's head never ends,
 * and N requests the upstream accepts and never answers — and holds them
 * all open. Built static by tests/tests/network.rs; used by its one boot.
 *
 *   stall IP HOST N SECONDS
 *
 * IP: the address netstack gave HOST (the test resolves it with nslookup,
 * since a static glibc cannot); prints "stalled N" once every connection
 * is open and its request sent, then sleeps SECONDS holding them. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int request(const char *ip, const char *host, const char *path) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) { perror("socket"); exit(1); }
    /* A small receive buffer: the stall shows sooner, as in a slow reader. */
    int small = 4096;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(80) };
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) { fprintf(stderr, "bad ip %s\n", ip); exit(1); }
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); exit(1); }
    char req[512];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", path, host);
    if (write(fd, req, n) != n) { perror("write"); exit(1); }
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: stall IP HOST N SECONDS\n"); return 2; }
    const char *ip = argv[1], *host = argv[2];
    int n = atoi(argv[3]), seconds = atoi(argv[4]);
    request(ip, host, "/flood");
    request(ip, host, "/nohead");
    for (int i = 0; i < n; i++) request(ip, host, "/hang");
    printf("stalled %d\n", n);
    fflush(stdout);
    sleep(seconds);
    return 0;
}
