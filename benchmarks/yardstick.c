/*
 * yardstick: the machine's limit for fan-out, in C with epoll. The figure every server
 * in benchmarks/ is compared with.
 *
 * It does what fastfan does and nothing more: each publish is encoded into its `message`
 * envelope and framed once, appended to every subscriber's output buffer, and every
 * connection with output is written once per turn of the event loop. It speaks enough of
 * the seed protocol for benchmarks/loadgen.c: upgrade (the accept key is not computed:
 * loadgen does not check it), welcome, subscribe/subscribed, publish. No auth, no limits,
 * no UTF-8 checks: a yardstick, not a server.
 *
 * Build: cc -O2 -o yardstick yardstick.c      Run: ./yardstick PORT
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define IN_SIZE (1 << 20)
#define READ_SIZE (64 * 1024)
/* Channel hash table slots. Channels are never removed, and the runner names each run's
   channels anew: with 1 << 16 slots, six runs of the channels scenario (10,000 each) filled
   the table to 92%, linear probing then took minutes per subscribe, and a seventh run would
   have found it full. 1 << 20 keeps the load under 10% for a whole suite. */
#define TABLE_SIZE (1 << 20)

typedef struct conn {
    int fd;
    int upgraded;
    char *in;
    size_t in_len;
    char *out;
    size_t out_off, out_len, out_cap; /* unsent bytes are out[out_off, out_len) */
    int dirty;     /* in the flush list of this loop turn */
    int want_out;  /* registered for EPOLLOUT: the kernel took only part of a write */
    struct channel *chans[16]; /* what it subscribed to (benchmarks use up to 10) */
    int nchans;
} conn_t;

typedef struct channel {
    char *name;
    conn_t **subs;
    size_t count, cap;
} channel_t;

static channel_t table[TABLE_SIZE];
static conn_t **dirty;
static size_t ndirty, dirty_cap;
static char *frame;
static size_t frame_cap;

static channel_t *channel_of(const char *name, size_t n, int create) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)name[i]) * 1099511628211ULL;
    for (size_t i = h % TABLE_SIZE;; i = (i + 1) % TABLE_SIZE) {
        channel_t *c = &table[i];
        if (!c->name) {
            if (!create) return NULL;
            c->name = strndup(name, n);
            return c;
        }
        if (strlen(c->name) == n && !memcmp(c->name, name, n)) return c;
    }
}

static void out_append(conn_t *c, const char *p, size_t n) {
    if (c->out_off && c->out_len + n > c->out_cap) { /* compact only when out of room */
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    if (c->out_len + n > c->out_cap) {
        c->out_cap = (c->out_len + n) * 2;
        c->out = realloc(c->out, c->out_cap);
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
    if (!c->dirty) {
        c->dirty = 1;
        if (ndirty == dirty_cap) {
            dirty_cap = dirty_cap ? 2 * dirty_cap : 1024;
            dirty = realloc(dirty, dirty_cap * sizeof *dirty);
        }
        dirty[ndirty++] = c;
    }
}

static size_t header(char *h, size_t n) {
    h[0] = (char)0x81;
    if (n < 126) { h[1] = (char)n; return 2; }
    if (n < 65536) { h[1] = 126; h[2] = (char)(n >> 8); h[3] = (char)n; return 4; }
    h[1] = 127;
    for (int i = 0; i < 8; i++) h[2 + i] = (char)(n >> (56 - 8 * i));
    return 10;
}

static void send_text(conn_t *c, const char *p, size_t n) {
    char h[10];
    out_append(c, h, header(h, n));
    out_append(c, p, n);
}

/* The end of the JSON value that starts at p (strings and nesting aware). */
static const char *value_end(const char *p, const char *end) {
    int depth = 0, in_string = 0;
    for (; p < end; p++) {
        char ch = *p;
        if (in_string) {
            if (ch == '\\') p++;
            else if (ch == '"') { in_string = 0; if (!depth) return p + 1; }
        } else if (ch == '"') in_string = 1;
        else if (ch == '{' || ch == '[') depth++;
        else if (ch == '}' || ch == ']') { if (--depth <= 0) return depth < 0 ? p : p + 1; }
        else if (!depth && (ch == ',')) return p;
    }
    return end;
}

static const char *string_field(const char *msg, size_t n, const char *key, size_t *len) {
    const char *k = memmem(msg, n, key, strlen(key));
    if (!k) return NULL;
    const char *v = k + strlen(key);
    const char *q = memchr(v, '"', (size_t)(msg + n - v));
    *len = q ? (size_t)(q - v) : 0;
    return v;
}

static void on_message(conn_t *c, char *msg, size_t n) {
    size_t clen;
    const char *ch = string_field(msg, n, "\"channel\":\"", &clen);
    if (!ch) return;
    if (memmem(msg, n, "\"type\":\"subscribe\"", 18)) {
        channel_t *chan = channel_of(ch, clen, 1);
        if (chan->count == chan->cap) {
            chan->cap = chan->cap ? 2 * chan->cap : 16;
            chan->subs = realloc(chan->subs, chan->cap * sizeof *chan->subs);
        }
        chan->subs[chan->count++] = c;
        if (c->nchans < 16) c->chans[c->nchans++] = chan;
        char reply[512];
        int r = snprintf(reply, sizeof reply, "{\"type\":\"subscribed\",\"channel\":\"%.*s\"}",
                         (int)clen, ch);
        send_text(c, reply, (size_t)r);
    } else if (memmem(msg, n, "\"type\":\"publish\"", 16)) {
        const char *d = memmem(msg, n, "\"data\":", 7);
        if (!d) return;
        d += 7;
        const char *dend = value_end(d, msg + n);
        channel_t *chan = channel_of(ch, clen, 0);
        if (!chan || !chan->count) return;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        size_t need = (size_t)(dend - d) + clen + 128;
        if (need > frame_cap) { frame_cap = 2 * need; frame = realloc(frame, frame_cap); }
        char *body = frame + 10;
        int len = sprintf(body, "{\"type\":\"message\",\"channel\":\"%.*s\",\"data\":", (int)clen, ch);
        memcpy(body + len, d, (size_t)(dend - d));
        len += (int)(dend - d);
        len += sprintf(body + len, ",\"from\":\"yardstick\",\"timestamp\":%lld}",
                       (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
        /* frame once, right before the body */
        char h[10];
        size_t hl = header(h, (size_t)len);
        memcpy(body - hl, h, hl);
        for (size_t i = 0; i < chan->count; i++) out_append(chan->subs[i], body - hl, hl + (size_t)len);
    }
}

static void drop(conn_t *c) {
    for (int i = 0; i < c->nchans; i++) {
        channel_t *chan = c->chans[i];
        for (size_t j = 0; j < chan->count; j++)
            if (chan->subs[j] == c) { chan->subs[j] = chan->subs[--chan->count]; break; }
    }
    for (size_t i = 0; i < ndirty; i++) if (dirty[i] == c) dirty[i] = dirty[--ndirty];
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

/* Parse complete client frames (masked) in c->in. Returns -1 when the peer closed. */
static int on_input(conn_t *c) {
    if (!c->upgraded) {
        char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
        if (!end) return 0;
        static const char ok[] = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 "Connection: Upgrade\r\nSec-WebSocket-Accept: yardstick\r\n\r\n";
        out_append(c, ok, sizeof ok - 1);
        static const char welcome[] = "{\"type\":\"welcome\",\"data\":{\"clientId\":\"y\"}}";
        send_text(c, welcome, sizeof welcome - 1);
        size_t head = (size_t)(end - c->in) + 4;
        memmove(c->in, c->in + head, c->in_len - head);
        c->in_len -= head;
        c->upgraded = 1;
    }
    size_t pos = 0;
    while (c->in_len - pos >= 6) {
        unsigned char *h = (unsigned char *)c->in + pos;
        uint64_t n = h[1] & 0x7f;
        size_t hl = 2;
        if (n == 126) { n = ((uint64_t)h[2] << 8) | h[3]; hl = 4; }
        else if (n == 127) { n = 0; for (int i = 0; i < 8; i++) n = (n << 8) | h[2 + i]; hl = 10; }
        if (c->in_len - pos < hl + 4 + n) break;
        unsigned char *mask = h + hl, *p = h + hl + 4;
        for (uint64_t i = 0; i < n; i++) p[i] ^= mask[i & 3];
        int opcode = h[0] & 0x0f;
        if (opcode == 0x8) return -1;
        if (opcode == 0x1) on_message(c, (char *)p, (size_t)n);
        pos += hl + 4 + n;
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
    return 0;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 9000;
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 4096)) {
        perror("yardstick: listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event events[1024];
    for (;;) {
        int ready = epoll_wait(ep, events, 1024, -1);
        for (int e = 0; e < ready; e++) {
            conn_t *c = events[e].data.ptr;
            if (!c) { /* accept everything pending */
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *n = calloc(1, sizeof *n);
                    n->fd = fd;
                    n->in = malloc(IN_SIZE);
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = n};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            if (events[e].events & EPOLLOUT) out_append(c, "", 0); /* write in this turn */
            if (events[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                /* Read as libuv does, at most 32 reads of 64 KiB per connection per turn:
                   reading until EAGAIN let a publisher that never pauses starve the writes
                   below (16 KiB data at 100k deliveries/s: none delivered), and one read
                   per turn let the publisher's socket fill (10,000 channels: half). */
                ssize_t r = 0;
                for (int reads = 0; reads < 32; reads++) {
                    size_t room = IN_SIZE - c->in_len < READ_SIZE ? IN_SIZE - c->in_len : READ_SIZE;
                    r = recv(c->fd, c->in + c->in_len, room, 0);
                    if (r <= 0) break;
                    c->in_len += (size_t)r;
                    if (on_input(c) < 0) { r = 0; break; }
                    if ((size_t)r < room) { r = 1; break; } /* emptied: no EAGAIN to ask for */
                }
                if (r == 0 || (r < 0 && errno != EAGAIN)) drop(c);
            }
        }
        /* end of the loop turn: one write per connection with output */
        for (size_t i = 0; i < ndirty; i++) {
            conn_t *c = dirty[i];
            c->dirty = 0;
            if (c->out_len == c->out_off) continue;
            ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
            if (w > 0) c->out_off += (size_t)w;
            if (c->out_off == c->out_len) c->out_off = c->out_len = 0;
            if (c->want_out != (c->out_len > 0)) { /* only when that changes */
                c->want_out = c->out_len > 0;
                struct epoll_event cev = {.events = EPOLLIN | (c->want_out ? EPOLLOUT : 0),
                                          .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
            }
        }
        ndirty = 0;
    }
}
