/*
 * loadgen: an open-loop fan-out load generator speaking the seed protocol.
 *
 * It opens SUBS subscriber connections and one publisher connection, subscribes every
 * subscriber to CHANNEL, then publishes RATE messages per second for DURATION seconds on
 * a fixed schedule (open loop: a slow server does not slow the offered load). Each
 * message's data is {"seq":N,"ts":NANOS,"pad":"..."} of SIZE bytes; every subscriber
 * checks that seq arrives in order without gaps and records the latency from ts
 * (CLOCK_MONOTONIC is shared by all processes of one machine).
 *
 * It prints one JSON object. Written in C with epoll so that it receives far more than
 * any server here can deliver; "busy" is the share of its time spent publishing, reading
 * and parsing (the rest it waits in epoll): below 0.5, it could take twice the load.
 *
 * With --channels N --per-conn K, subscriber i takes K of the N channels (see channel_of):
 * as many subscribers as channels gives every channel K subscribers.
 *
 * With --protocol socketio it speaks the seed protocol inside Socket.IO's framing (see
 * peers/socketio.js): Engine.IO's open packet, the namespace CONNECT "40", each message as
 * an event named by its type, 42["publish",{...}], and a pong "3" for each ping "2".
 *
 * With --protocol pusher its subscribers speak Pusher's protocol 7 (fastfan --pusher-app,
 * on --path /app/KEY?protocol=7...): pusher:subscribe, pusher_internal:subscription_succeeded,
 * and events whose `data` is a JSON string, where seq, ch and ts read \"seq\":N. A Pusher
 * client cannot publish on a public channel: the publisher is then the server API.
 *
 * With --publish api --api-port P --api-key K the publisher is fastfan's server API: one
 * keep-alive HTTP connection, POST /api/publish pipelined on the same open-loop schedule
 * (the answers are read as they come; any but 200 counts in "api_refused"), each to
 * --publish-prefix + the channel; with --api-event NAME the data is the Pusher event
 * {"event":NAME,"data":{...}} (what fastfan's API publishes to a channel pusher.ID.C), and
 * every subscriber, Pusher's or fastfan's, receives its data as a JSON string.
 *
 * With --rate 0 it only subscribes and counts (the publisher is another loadgen); with
 * --sync 1 it prints {"ready":...} once subscribed and waits for a line on stdin, so that
 * a runner can measure idle memory and start many loadgen processes together. With
 * --sync 2 it also waits for a line after printing its summary, before it closes its
 * connections: the runner reads the server's CPU time for the publishing alone.
 *
 * For overload (benchmarks/studies/overload.py): --then RATE:SECONDS[,RATE:SECONDS...]
 * publishes in further phases after the first (--rate for --duration), each on its own
 * schedule: what a phase could not send because the server held the publisher back is not
 * sent later. --tolerate-close 1 counts a subscriber the server closes ("closed") instead
 * of exiting, and stops expecting its messages; --stall N subscribes N more connections
 * that never read (a 4 KiB receive buffer): the truly slow consumers, counted apart
 * ("stalled_closed"). --window-ms W adds "windows": for each W ms of send time from
 * "origin_ns" (the first message's ts), [count, p99 ms] of the messages sent in it, and
 * how many deliveries were received in it.
 *
 * Build: cc -O2 -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
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

#define READ_BUFFER (256 * 1024)
#define LATENCY_BUCKETS (10 * 1000 * 1000) /* 1 us buckets, up to 10 s */

typedef struct {
    int fd;
    int index;              /* subscriber i */
    char *buf;
    size_t len;
    int64_t *next_seq;      /* per channel it subscribed to: the seq it expects next */
    uint64_t received;
    int closed;             /* --tolerate-close: the server closed it */
} conn_t;

/* Subscriber i takes per_conn channels, (i + j * stride) % nchannels for j < per_conn,
   stride = nchannels / per_conn: with as many subscribers as channels, every channel has
   per_conn subscribers. Publishes go round-robin over the channels. */
static int nchannels = 1, per_conn = 1, stride = 1;

static int channel_of(int subscriber, int j) { return (subscriber + j * stride) % nchannels; }

static int socketio = 0; /* --protocol socketio */
static int pusher = 0;   /* --protocol pusher */
static char *event_scratch;
/* --publish api: the publisher is the server API (HTTP), on api_port with api_key; its
   publishes go to publish_prefix + channel, as the Pusher event api_event if given */
static int publish_api = 0, api_port = 0;
static const char *api_key = "", *publish_prefix = "", *api_event = NULL;
static uint64_t api_answered, api_refused;
/* The data reaches the subscribers as a JSON string (a Pusher event): \"seq\":N */
static int escaped = 0;

static uint64_t *latency_us;
static uint64_t latency_count, latency_over;
static uint64_t lost, reordered, delivered;

/* --window-ms: per window of send time, a latency histogram in log buckets (20 per
   decade from 1 us to 100 s), so that a p99 per window costs little memory */
#define WINDOW_BUCKETS 160
#define MAX_WINDOWS 4096
static int64_t window_ns, origin_ns;
static uint32_t (*windows)[WINDOW_BUCKETS];
static uint64_t *window_received; /* deliveries received in each window (receive time) */
static int nwindows;

static double bucket_top[WINDOW_BUCKETS]; /* bucket b: latencies below 10^((b+1)/20) us */

static void make_buckets(void) {
    double top = 1.1220184543019633; /* 10^(1/20): no libm needed */
    for (int b = 0; b < WINDOW_BUCKETS; b++, top *= 1.1220184543019633) bucket_top[b] = top;
}

static int log_bucket(uint64_t us) {
    int low = 0, high = WINDOW_BUCKETS - 1; /* the first bucket whose top is above us */
    while (low < high) {
        int mid = (low + high) / 2;
        if ((double)us < bucket_top[mid]) high = mid;
        else low = mid + 1;
    }
    return low;
}

static void window_record(int64_t ts, int64_t now, uint64_t us) {
    if (!origin_ns) origin_ns = ts;
    int64_t w = (ts - origin_ns) / window_ns, r = (now - origin_ns) / window_ns;
    if (r >= 0 && r < MAX_WINDOWS) {
        window_received[r]++;
        if (r >= nwindows) nwindows = (int)r + 1;
    }
    if (w < 0 || w >= MAX_WINDOWS) return;
    if (w >= nwindows) nwindows = (int)w + 1;
    windows[w][log_bucket(us)]++;
}

static void print_windows(void) {
    printf(",\"origin_ns\":%lld,\"window_ms\":%lld,\"windows\":[", (long long)origin_ns,
           (long long)(window_ns / 1000000));
    for (int w = 0; w < nwindows; w++) {
        uint64_t count = 0, seen = 0;
        for (int b = 0; b < WINDOW_BUCKETS; b++) count += windows[w][b];
        double p99 = 0;
        for (int b = 0; b < WINDOW_BUCKETS && count; b++) {
            seen += windows[w][b];
            if (seen * 100 >= count * 99) { /* the bucket's upper edge, in ms */
                p99 = bucket_top[b] / 1000.0;
                break;
            }
        }
        printf("%s[%llu,%.3f,%llu]", w ? "," : "", (unsigned long long)count, p99,
               (unsigned long long)window_received[w]);
    }
    printf("]");
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* A masked client frame (mask key 0: valid, and the payload stays as it is). */
static size_t frame(char *out, const char *payload, size_t n) {
    size_t h = 0;
    out[h++] = (char)0x81;
    if (n < 126) {
        out[h++] = (char)(0x80 | n);
    } else if (n < 65536) {
        out[h++] = (char)(0x80 | 126);
        out[h++] = (char)(n >> 8);
        out[h++] = (char)(n & 0xff);
    } else {
        out[h++] = (char)(0x80 | 127);
        for (int i = 7; i >= 0; i--) out[h++] = (char)((n >> (8 * i)) & 0xff);
    }
    memset(out + h, 0, 4);
    h += 4;
    memcpy(out + h, payload, n);
    return h + n;
}

/* One seed message as a frame: as it is, or as the Socket.IO event named TYPE. */
static size_t frame_message(char *out, const char *type, const char *json, size_t n) {
    if (!socketio) return frame(out, json, n);
    int h = sprintf(event_scratch, "42[\"%s\",", type);
    memcpy(event_scratch + h, json, n);
    event_scratch[(size_t)h + n] = ']';
    return frame(out, event_scratch, (size_t)h + n + 1);
}

static void send_all(int fd, const char *p, size_t n) {
    int64_t stuck_since = 0;
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) { /* the server is not reading: wait, but not for ever */
                if (!stuck_since) stuck_since = now_ns();
                if (now_ns() - stuck_since > 10000000000LL) {
                    fprintf(stderr, "loadgen: the server read nothing for 10 s\n");
                    exit(1);
                }
                usleep(50);
                continue;
            }
            die("send");
        }
        stuck_since = 0;
        p += w;
        n -= (size_t)w;
    }
}

/* Read until the buffer holds `needle`; blocking socket. */
static void read_until(conn_t *c, const char *needle) {
    while (!memmem(c->buf, c->len, needle, strlen(needle))) {
        ssize_t r = recv(c->fd, c->buf + c->len, READ_BUFFER - c->len, 0);
        if (r <= 0) die("handshake recv");
        c->len += (size_t)r;
    }
}

static void drop_http_head(conn_t *c) {
    char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
    size_t head = (size_t)(end - c->buf) + 4;
    if (strncmp(c->buf, "HTTP/1.1 101", 12) != 0) {
        fprintf(stderr, "loadgen: upgrade refused: %.*s\n", (int)head, c->buf);
        exit(1);
    }
    memmove(c->buf, c->buf + head, c->len - head);
    c->len -= head;
}

static int receive_buffer; /* SO_RCVBUF of the next connections, when not 0 (--stall) */

static void tcp_connect(conn_t *c, const char *source, const char *host, int port) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &addr.sin_addr);
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0) die("socket");
    if (receive_buffer) /* before connect: the window it offers is this small from the start */
        setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &receive_buffer, sizeof receive_buffer);
    if (source) {
        struct sockaddr_in src = {.sin_family = AF_INET};
        inet_pton(AF_INET, source, &src.sin_addr);
        if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0) die("bind source");
    }
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->buf = malloc(READ_BUFFER);
    c->len = 0;
}

static void open_conn(conn_t *c, const char *source, const char *host, int port,
                      const char *path) {
    tcp_connect(c, source, host, port);
    char request[2048];
    int n = snprintf(request, sizeof request,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n", path, host, port);
    send_all(c->fd, request, (size_t)n);
    read_until(c, "\r\n\r\n");
    drop_http_head(c);
    if (socketio) { /* Engine.IO's open packet, then join the main namespace */
        char connect[8];
        read_until(c, "\"sid\"");
        send_all(c->fd, connect, frame(connect, "40", 2));
    }
    read_until(c, pusher ? "pusher:connection_established" : "\"welcome\"");
    c->len = 0; /* nothing else is sent before we ask */
}

static size_t count_of(const char *buf, size_t len, const char *needle) {
    size_t count = 0, n = strlen(needle);
    for (const char *p = buf; (p = memmem(p, len - (size_t)(p - buf), needle, n)); p += n)
        count++;
    return count;
}

/* Subscribe to every channel of this subscriber in one write; wait for every answer. */
static void subscribe(conn_t *c, const char *channel) {
    char msg[512], *out = malloc((size_t)per_conn * 600);
    size_t o = 0;
    for (int j = 0; j < per_conn; j++) {
        char name[300];
        if (nchannels > 1) snprintf(name, sizeof name, "%s.%d", channel, channel_of(c->index, j));
        else snprintf(name, sizeof name, "%s", channel);
        int n = pusher
            ? snprintf(msg, sizeof msg,
                       "{\"event\":\"pusher:subscribe\",\"data\":{\"channel\":\"%s\"}}", name)
            : snprintf(msg, sizeof msg, "{\"type\":\"subscribe\",\"channel\":\"%s\"}", name);
        o += frame_message(out + o, "subscribe", msg, (size_t)n);
    }
    send_all(c->fd, out, o);
    free(out);
    /* one "subscribed" per reply; Socket.IO's event name says it a second time */
    const char *reply = pusher ? "pusher_internal:subscription_succeeded"
                      : socketio ? "42[\"subscribed\"" : "\"subscribed\"";
    while (count_of(c->buf, c->len, reply) < (size_t)per_conn) {
        ssize_t r = recv(c->fd, c->buf + c->len, READ_BUFFER - c->len, 0);
        if (r <= 0) die("subscribe recv");
        c->len += (size_t)r;
    }
    c->len = 0;
}

/* Where the number of field `key` ("seq":, or \"seq\": when escaped) begins, or NULL. */
static const char *number_of(const char *p, size_t n, const char *key) {
    char needle[16];
    size_t k = (size_t)(escaped ? snprintf(needle, sizeof needle, "\\\"%s\\\":", key)
                                : snprintf(needle, sizeof needle, "\"%s\":", key));
    const char *at = memmem(p, n, needle, k);
    return at ? at + k : NULL;
}

static void record(conn_t *c, const char *payload, size_t n, int64_t now) {
    const char *p = number_of(payload, n, "seq");
    if (!p) return; /* not one of ours */
    char *end;
    int64_t seq = strtoll(p, &end, 10);
    int j = 0;
    if (per_conn > 1) { /* which of its channels: data is {"seq":N,"ch":K,...} */
        const char *ch_at = number_of(end, n - (size_t)(end - payload), "ch");
        int ch = ch_at ? (int)strtol(ch_at, &end, 10) : 0;
        j = ((ch - c->index) % nchannels + nchannels) % nchannels / stride;
    }
    const char *t = number_of(payload, n, "ts");
    int64_t ts = t ? strtoll(t, NULL, 10) : now;
    if (seq > c->next_seq[j]) lost += (uint64_t)(seq - c->next_seq[j]);
    if (seq < c->next_seq[j]) reordered++;
    else c->next_seq[j] = seq + 1;
    c->received++;
    delivered++;
    uint64_t us = (uint64_t)((now - ts) / 1000);
    if (us < LATENCY_BUCKETS) latency_us[us]++;
    else latency_over++;
    latency_count++;
    if (window_ns) window_record(ts, now, us);
}

/* Parse every whole frame in the buffer; keep a partial one for the next read. */
static void parse(conn_t *c, int64_t now) {
    size_t pos = 0;
    while (c->len - pos >= 2) {
        unsigned char *h = (unsigned char *)c->buf + pos;
        uint64_t n = h[1] & 0x7f;
        size_t hl = 2;
        if (n == 126) {
            if (c->len - pos < 4) break;
            n = ((uint64_t)h[2] << 8) | h[3];
            hl = 4;
        } else if (n == 127) {
            if (c->len - pos < 10) break;
            n = 0;
            for (int i = 0; i < 8; i++) n = (n << 8) | h[2 + i];
            hl = 10;
        }
        if (c->len - pos < hl + n) break;
        if ((h[0] & 0x0f) == 0x1) {
            if (socketio && n == 1 && h[hl] == '2') { /* Engine.IO ping: answer or be dropped */
                char pong[8];
                send_all(c->fd, pong, frame(pong, "3", 1));
            } else {
                record(c, (char *)h + hl, (size_t)n, now);
            }
        }
        pos += hl + n;
    }
    memmove(c->buf, c->buf + pos, c->len - pos);
    c->len -= pos;
}

/* The server API's answers to the pipelined publishes: each whole one counted (any status
   but 200 as refused); a partial one kept for the next read. */
static void parse_answers(conn_t *c) {
    size_t pos = 0;
    while (1) {
        char *head_end = memmem(c->buf + pos, c->len - pos, "\r\n\r\n", 4);
        if (!head_end) break;
        size_t head = (size_t)(head_end - (c->buf + pos)) + 4, body = 0;
        char *length = memmem(c->buf + pos, head, "Content-Length:", 15);
        if (!length) length = memmem(c->buf + pos, head, "content-length:", 15);
        if (length) body = (size_t)strtoul(length + 15, NULL, 10);
        if (c->len - pos < head + body) break;
        if (strncmp(c->buf + pos, "HTTP/1.1 200", 12) != 0) {
            if (!api_refused)
                fprintf(stderr, "loadgen: the API refused a publish: %.*s\n",
                        (int)(head + body), c->buf + pos);
            api_refused++;
        }
        api_answered++;
        pos += head + body;
    }
    memmove(c->buf, c->buf + pos, c->len - pos);
    c->len -= pos;
}

static double percentile(double q) {
    uint64_t target = (uint64_t)(q * (double)(latency_count ? latency_count - 1 : 0)), seen = 0;
    for (uint64_t i = 0; i < LATENCY_BUCKETS; i++) {
        seen += latency_us[i];
        if (seen > target) return (double)i / 1000.0;
    }
    return (double)LATENCY_BUCKETS / 1000.0;
}

/* --tolerate-close: a subscriber the server closed; its messages are no longer expected */
static int closed_count;

static void subscriber_closed(int ep, conn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->closed = 1;
    closed_count++;
}

/* Whether the server has closed (or reset) a connection we never read: its TCP state. */
static int peer_gone(int fd) {
    struct tcp_info info;
    socklen_t n = sizeof info;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &n) < 0) return 1;
    return info.tcpi_state != TCP_ESTABLISHED;
}

#define MAX_PHASES 16

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *path = NULL, *channel = "bench", *sources = NULL;
    const char *then = NULL;
    int port = 8080, subs = 1000, size = 100, tolerate_close = 0, stall = 0, window_ms = 0;
    double rate = 1000, duration = 5, drain = 3;
    int sync_start = 0; /* 1: say "ready" on stdout once subscribed, wait for a line on stdin;
                           2: and wait for another after the summary, before closing */
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--host")) host = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--path")) path = argv[i + 1];
        else if (!strcmp(argv[i], "--channel")) channel = argv[i + 1];
        else if (!strcmp(argv[i], "--subs")) subs = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--size")) size = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--rate")) rate = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--drain")) drain = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--sources")) sources = argv[i + 1];
        else if (!strcmp(argv[i], "--sync")) sync_start = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--channels")) nchannels = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--per-conn")) per_conn = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--then")) then = argv[i + 1];
        else if (!strcmp(argv[i], "--tolerate-close")) tolerate_close = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--stall")) stall = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--window-ms")) window_ms = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--protocol") && !strcmp(argv[i + 1], "seed")) socketio = 0;
        else if (!strcmp(argv[i], "--protocol") && !strcmp(argv[i + 1], "socketio")) socketio = 1;
        else if (!strcmp(argv[i], "--protocol") && !strcmp(argv[i + 1], "pusher")) pusher = 1;
        else if (!strcmp(argv[i], "--publish") && !strcmp(argv[i + 1], "websocket")) publish_api = 0;
        else if (!strcmp(argv[i], "--publish") && !strcmp(argv[i + 1], "api")) publish_api = 1;
        else if (!strcmp(argv[i], "--api-port")) api_port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--api-key")) api_key = argv[i + 1];
        else if (!strcmp(argv[i], "--publish-prefix")) publish_prefix = argv[i + 1];
        else if (!strcmp(argv[i], "--api-event")) api_event = argv[i + 1];
        else { fprintf(stderr, "loadgen: unknown option %s\n", argv[i]); return 2; }
    }
    if (per_conn < 1 || nchannels % per_conn) {
        fprintf(stderr, "loadgen: --channels must be a multiple of --per-conn\n");
        return 2;
    }
    stride = nchannels / per_conn;
    /* the publishing phases: --rate for --duration, then --then's */
    double phase_rate[MAX_PHASES] = {rate}, phase_s[MAX_PHASES] = {duration};
    int nphases = 1;
    if (then) {
        char *copy = strdup(then);
        for (char *s = strtok(copy, ","); s && nphases < MAX_PHASES; s = strtok(NULL, ",")) {
            if (sscanf(s, "%lf:%lf", &phase_rate[nphases], &phase_s[nphases]) != 2) {
                fprintf(stderr, "loadgen: --then wants RATE:SECONDS[,RATE:SECONDS...]\n");
                return 2;
            }
            duration += phase_s[nphases++];
        }
    }
    if (window_ms > 0) {
        window_ns = (int64_t)window_ms * 1000000;
        windows = calloc(MAX_WINDOWS, sizeof *windows);
        window_received = calloc(MAX_WINDOWS, sizeof *window_received);
        make_buckets();
    }
    if (pusher && rate > 0 && !publish_api) {
        fprintf(stderr, "loadgen: a Pusher client cannot publish: --publish api\n");
        return 2;
    }
    escaped = pusher || api_event != NULL;
    if (!path) path = socketio ? "/socket.io/?EIO=4&transport=websocket"
                    : pusher ? "/app/bench-key?protocol=7&client=js&version=8.4.0" : "/";
    event_scratch = malloc((size_t)size + 1024);
    latency_us = calloc(LATENCY_BUCKETS, sizeof(uint64_t));

    /* Spread subscribers over source addresses: one (source, destination) pair has
       about 28,000 ephemeral ports. */
    char *source_list[64];
    int nsources = 0;
    if (sources) {
        char *copy = strdup(sources);
        for (char *s = strtok(copy, ","); s && nsources < 64; s = strtok(NULL, ","))
            source_list[nsources++] = s;
    }

    conn_t *conns = calloc((size_t)subs + 1, sizeof(conn_t));
    int64_t t0 = now_ns();
    char name[512];
    for (int i = 0; i < subs; i++) {
        conns[i].index = i;
        conns[i].next_seq = calloc((size_t)per_conn, sizeof(int64_t));
        open_conn(&conns[i], nsources ? source_list[i % nsources] : NULL, host, port, path);
        subscribe(&conns[i], channel);
    }
    double connect_s = (double)(now_ns() - t0) / 1e9;
    conn_t *stalled = calloc((size_t)stall + 1, sizeof(conn_t));
    receive_buffer = 4096;
    for (int i = 0; i < stall; i++) { /* subscribed, then never read */
        stalled[i].index = i;
        open_conn(&stalled[i], NULL, host, port, path);
        subscribe(&stalled[i], channel);
    }
    receive_buffer = 0;
    conn_t *pub = &conns[subs];
    if (rate > 0 && publish_api) tcp_connect(pub, NULL, host, api_port);
    else if (rate > 0) open_conn(pub, NULL, host, port, path);
    if (sync_start) {
        char line[16];
        printf("{\"ready\":true,\"connect_s\":%.3f}\n", connect_s);
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 1;
    }

    int ep = epoll_create1(0);
    for (int i = 0; i < subs; i++) {
        fcntl(conns[i].fd, F_SETFL, O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
    }
    if (rate > 0) { /* read too: nothing comes but Socket.IO's pings, which want a pong */
        pub->next_seq = calloc(1, sizeof(int64_t));
        fcntl(pub->fd, F_SETFL, O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = pub};
        epoll_ctl(ep, EPOLL_CTL_ADD, pub->fd, &ev);
    }

    /* The message template: data of `size` bytes, seq and ts filled in per message. */
    char *msg = malloc((size_t)size + 768), *out = malloc(64 * ((size_t)size + 800));
    struct epoll_event events[512];
    int64_t start = now_ns(), end = start + (int64_t)(duration * 1e9);
    int64_t stop = end + (int64_t)(drain * 1e9), sent = 0, last_rx = start;
    int64_t expected_total, busy_ns = 0; /* time spent publishing, reading and parsing */
    int phase = 0;
    int64_t phase_start = start, phase_sent = 0, phase_end = start + (int64_t)(phase_s[0] * 1e9);
    int64_t sent_in[MAX_PHASES] = {0};
    while (1) {
        int64_t now = now_ns();
        while (now >= phase_end && phase + 1 < nphases) { /* the next phase, on its own clock */
            sent_in[phase] = sent - phase_sent;
            phase++;
            phase_start = phase_end;
            phase_sent = sent;
            phase_end = phase_start + (int64_t)(phase_s[phase] * 1e9);
            rate = phase_rate[phase];
        }
        if (now < end && rate > 0) {
            int64_t due = phase_sent + (int64_t)((double)(now - phase_start) * rate / 1e9) + 1;
            while (sent < due) { /* batch what is due into one write */
                size_t o = 0;
                for (int k = 0; k < 64 && sent < due; k++, sent++) {
                    /* message `sent` goes to channel sent % nchannels, as its number
                       sent / nchannels there: each channel's subscribers see 0, 1, 2... */
                    if (nchannels > 1)
                        snprintf(name, sizeof name, "%s.%lld", channel,
                                 (long long)(sent % nchannels));
                    int n = snprintf(msg, 768, "{\"type\":\"publish\",\"channel\":\"%s%s\","
                                     "\"data\":%s%s%s{\"seq\":%lld,\"ch\":%d,\"ts\":%lld,"
                                     "\"pad\":\"", publish_api ? publish_prefix : "",
                                     nchannels > 1 ? name : channel,
                                     api_event ? "{\"event\":\"" : "", api_event ? api_event : "",
                                     api_event ? "\",\"data\":" : "",
                                     (long long)(sent / nchannels), (int)(sent % nchannels),
                                     (long long)now_ns());
                    int data_start = (int)(strstr(msg, "{\"seq\":") - msg);
                    int pad = size - (n - data_start) - 2;
                    if (pad < 0) pad = 0;
                    memset(msg + n, 'x', (size_t)pad);
                    size_t m = (size_t)(n + pad);
                    memcpy(msg + m, "\"}}}", api_event ? 4 : 3);
                    m += api_event ? 4 : 3;
                    if (publish_api) { /* the body: the message less its "type" */
                        size_t type = strlen("{\"type\":\"publish\",");
                        int h = snprintf(out + o, 512, "POST /api/publish HTTP/1.1\r\n"
                                         "Host: bench\r\nAuthorization: apikey %s\r\n"
                                         "Content-Length: %zu\r\n\r\n{", api_key, m - type + 1);
                        memcpy(out + o + h, msg + type, m - type);
                        o += (size_t)h + m - type;
                    } else {
                        o += frame_message(out + o, "publish", msg, m);
                    }
                }
                send_all(pub->fd, out, o);
            }
        } else if (rate > 0 ? delivered >= (uint64_t)(sent * (subs - closed_count) * per_conn /
                                                      nchannels) || now > stop
                            : now > end && now - last_rx > (int64_t)(drain * 1e9)) {
            break; /* all arrived, or (subscribers only) quiet for the drain time */
        }
        int64_t next = phase_start + (int64_t)((double)(sent - phase_sent) * 1e9 /
                                               (rate > 0 ? rate : 1));
        /* Publishing ticks at least every millisecond (what is due then goes in one write;
           each message's ts is taken as it is written), so the loop never spins. */
        int timeout_ms = now < end && rate > 0 ? (int)((next - now_ns()) / 1000000) : 10;
        if (timeout_ms < 1) timeout_ms = 1;
        busy_ns += now_ns() - now;
        int ready = epoll_wait(ep, events, 512, timeout_ms);
        int64_t woke = now_ns();
        for (int e = 0; e < ready; e++) {
            conn_t *c = events[e].data.ptr;
            while (1) {
                size_t room = READ_BUFFER - c->len;
                ssize_t r = recv(c->fd, c->buf + c->len, room, 0);
                int64_t rx = now_ns(); /* per read: what a read returns was sent before it */
                if (r > 0) {
                    c->len += (size_t)r;
                    if (c == pub && publish_api) {
                        parse_answers(c);
                        if ((size_t)r < room) break;
                        continue;
                    }
                    parse(c, rx);
                    last_rx = rx;
                    /* A short read emptied the socket: skip the recv that would say EAGAIN
                       (epoll reports the socket again when more comes). */
                    if ((size_t)r < room) break;
                    continue;
                }
                if (errno == EAGAIN && r < 0) break;
                if (tolerate_close && c != pub) {
                    subscriber_closed(ep, c);
                    break;
                }
                if (r == 0) { fprintf(stderr, "loadgen: server closed a subscriber\n"); exit(1); }
                die("recv");
            }
        }
        busy_ns += now_ns() - woke;
    }
    /* each channel got sent / nchannels messages, the first sent % nchannels one more */
    sent_in[phase] = sent - phase_sent;
    expected_total = 0;
    for (int i = 0; i < subs; i++) {
        if (conns[i].closed) continue; /* counted in "closed" */
        for (int j = 0; j < per_conn; j++) {
            int64_t mine = sent / nchannels + (channel_of(i, j) < sent % nchannels ? 1 : 0);
            expected_total += mine;
            if (rate > 0) lost += (uint64_t)(mine - conns[i].next_seq[j]); /* never arrived */
        }
    }
    double active_s = (double)(last_rx - start) / 1e9;
    printf("{\"subs\":%d,\"size\":%d,\"rate\":%.0f,\"offered_per_s\":%.0f,\"sent\":%lld,"
           "\"expected\":%lld,\"delivered\":%llu,\"lost\":%llu,\"reordered\":%llu,"
           "\"delivered_per_s\":%.0f,\"connect_s\":%.3f,\"p50_ms\":%.3f,\"p99_ms\":%.3f,"
           "\"p999_ms\":%.3f,\"max_ms\":%.3f,\"over_10s\":%llu,\"busy\":%.3f,"
           "\"api_answered\":%llu,\"api_refused\":%llu",
           subs, size, phase_rate[0], phase_rate[0] * subs * per_conn / nchannels,
           (long long)sent,
           (long long)expected_total,
           (unsigned long long)delivered, (unsigned long long)lost,
           (unsigned long long)reordered, (double)delivered / (active_s > 0 ? active_s : 1),
           connect_s, percentile(0.5), percentile(0.99), percentile(0.999), percentile(1.0),
           (unsigned long long)latency_over, (double)busy_ns / (double)(now_ns() - start),
           (unsigned long long)api_answered, (unsigned long long)api_refused);
    if (tolerate_close || stall) {
        int stalled_closed = 0;
        for (int i = 0; i < stall; i++) stalled_closed += peer_gone(stalled[i].fd);
        printf(",\"closed\":%d,\"stalled\":%d,\"stalled_closed\":%d", closed_count, stall,
               stalled_closed);
    }
    if (nphases > 1) {
        printf(",\"start_ns\":%lld,\"phases\":[", (long long)start);
        for (int k = 0; k < nphases; k++)
            printf("%s{\"rate\":%.0f,\"seconds\":%.3f,\"sent\":%lld}", k ? "," : "",
                   phase_rate[k], phase_s[k], (long long)sent_in[k]);
        printf("]");
    }
    if (window_ns) print_windows();
    printf("}\n");
    if (sync_start == 2) {
        char line[16];
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 0; /* EOF: the runner is done too */
    }
    return 0;
}
