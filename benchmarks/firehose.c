/*
 * firehose: how much benchmarks/loadgen.c can receive, measured against a sender that
 * costs almost nothing per message.
 *
 * It accepts SUBS loadgen subscribers (upgrade, welcome, subscribe, subscribed: what
 * loadgen waits for), then for DURATION seconds writes every subscriber the same batch of
 * BATCH `message` frames, one send() per subscriber per batch, with seq counting up and ts
 * taken per batch, as fast as the subscribers take them (blocking sockets: the receiver
 * sets the pace). A server pays a send per subscriber per turn and per-message work on
 * top; this pays one send per BATCH messages and nothing per message, so what loadgen
 * reports here is its own ceiling, not the sender's.
 *
 * Build: cc -O2 -o firehose firehose.c      Run: ./firehose PORT SUBS DURATION [BATCH [SIZE]]
 * (SIZE: bytes of `data`, 100 by default as in the suite's fan-out scenario)
 */
#define _GNU_SOURCE
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void send_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0) { perror("firehose: send"); exit(1); }
        p += w;
        n -= (size_t)w;
    }
}

/* An unmasked server text frame. */
static size_t frame(char *out, const char *payload, size_t n) {
    size_t h = 0;
    out[h++] = (char)0x81;
    if (n < 126) {
        out[h++] = (char)n;
    } else if (n < 65536) {
        out[h++] = 126;
        out[h++] = (char)(n >> 8);
        out[h++] = (char)(n & 0xff);
    } else {
        out[h++] = 127;
        for (int i = 7; i >= 0; i--) out[h++] = (char)((n >> (8 * i)) & 0xff);
    }
    memcpy(out + h, payload, n);
    return h + n;
}

static void read_until(int fd, char *buf, size_t cap, const char *needle) {
    size_t len = 0;
    while (!memmem(buf, len, needle, strlen(needle))) {
        ssize_t r = recv(fd, buf + len, cap - len, 0);
        if (r <= 0) { perror("firehose: recv"); exit(1); }
        len += (size_t)r;
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: firehose PORT SUBS DURATION [BATCH [SIZE]]\n");
        return 2;
    }
    int port = atoi(argv[1]), subs = atoi(argv[2]);
    double duration = atof(argv[3]);
    int batch = argc > 4 ? atoi(argv[4]) : 64, size = argc > 5 ? atoi(argv[5]) : 100;

    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 4096)) {
        perror("firehose: listen");
        return 1;
    }
    int *fds = calloc((size_t)subs, sizeof(int));
    char buf[4096], out[512];
    const char *upgrade = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n";
    for (int i = 0; i < subs; i++) { /* loadgen connects and subscribes one at a time */
        fds[i] = accept(listener, NULL, NULL);
        setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        read_until(fds[i], buf, sizeof buf, "\r\n\r\n");
        send_all(fds[i], upgrade, strlen(upgrade));
        const char *welcome = "{\"type\":\"welcome\",\"data\":{\"clientId\":\"f\"}}";
        send_all(fds[i], out, frame(out, welcome, strlen(welcome)));
        read_until(fds[i], buf, sizeof buf, "}");
        const char *subscribed = "{\"type\":\"subscribed\",\"channel\":\"bench\"}";
        send_all(fds[i], out, frame(out, subscribed, strlen(subscribed)));
    }

    size_t room_per_message = (size_t)size + 256;
    char *batch_bytes = malloc((size_t)batch * room_per_message), *msg = malloc(room_per_message);
    char *pad = malloc((size_t)size + 1);
    int64_t seq = 0, rounds = 0, start = now_ns(), end = start + (int64_t)(duration * 1e9);
    while (now_ns() < end) {
        size_t len = 0;
        int64_t ts = now_ns();
        for (int k = 0; k < batch; k++, seq++) {
            int n = snprintf(msg, room_per_message, "{\"seq\":%lld,\"ts\":%lld,\"pad\":\"",
                             (long long)seq, (long long)ts);
            int room = size - n - 2;
            memset(pad, 'x', (size_t)(room > 0 ? room : 0));
            pad[room > 0 ? room : 0] = 0;
            n = snprintf(msg, room_per_message,
                         "{\"type\":\"message\",\"channel\":\"bench\",\"data\":"
                         "{\"seq\":%lld,\"ts\":%lld,\"pad\":\"%s\"},\"from\":\"f\","
                         "\"timestamp\":0}", (long long)seq, (long long)ts, pad);
            len += frame(batch_bytes + len, msg, (size_t)n);
        }
        for (int i = 0; i < subs; i++) send_all(fds[i], batch_bytes, len);
        rounds++;
    }
    double seconds = (double)(now_ns() - start) / 1e9;
    printf("{\"subs\":%d,\"batch\":%d,\"messages_per_sub\":%lld,\"sent_per_s\":%.0f}\n", subs,
           batch, (long long)seq, (double)seq * subs / seconds);
    fflush(stdout);
    for (int i = 0; i < subs; i++) /* loadgen closes once it has read everything */
        while (recv(fds[i], buf, sizeof buf, 0) > 0) {}
    return 0;
}
