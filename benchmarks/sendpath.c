/*
 * sendpath: what one fan-out write per connection costs on loopback TCP, by method.
 *
 * A receiver (pinned to CPU 1) accepts N connections and drains them with epoll; the
 * sender (CPU 0) writes, for R rounds, one S-byte message to each of the N connections:
 *   send      one send() per socket, as fastfan and the yardstick do;
 *   uring     one IORING_OP_SEND per socket, all of a round submitted and reaped in a
 *             single io_uring_enter (raw syscalls, no liburing);
 *   zerocopy  send(MSG_ZEROCOPY) per socket; completions reaped from MSG_ERRQUEUE, and a
 *             round's buffer is reused only once every socket has released it.
 * Printed, per message: the sender's CPU (getrusage user+sys; it includes the loopback
 * receive work its sends run inline in softirq) plus the CPU ksoftirqd/0 spent meanwhile
 * (softirq work deferred off the sender: it differs by method), the receiver's CPU; and the
 * wall time per round, and whether every byte arrived.
 *
 * Build: cc -O2 -o /tmp/sendpath sendpath.c     Run: /tmp/sendpath METHOD N S R
 */
#define _GNU_SOURCE
#include <time.h> /* before linux/errqueue.h, which needs struct timespec */
#include <linux/errqueue.h>
#include <linux/io_uring.h>
#include <dirent.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define SLOTS 8 /* zerocopy: rounds in flight before a buffer must be reused */
#define die(what) do { perror(what); exit(1); } while (0)
#define fail(...) do { fprintf(stderr, __VA_ARGS__); exit(1); } while (0)
#define RW (PROT_READ | PROT_WRITE)

static double cpu_s(void) { /* user + system CPU of this process, threads included */
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec
           + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}
static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
/* CPU time of ksoftirqd/0, the thread that runs CPU 0's softirqs when they are deferred. */
static double ksoftirqd0_s(void) {
    static char path[300];
    char p[300], comm[32];
    long long ns = 0;
    DIR *d = path[0] ? NULL : opendir("/proc");
    for (struct dirent *e; d && (e = readdir(d));) { /* find it once, by name */
        snprintf(p, sizeof p, "/proc/%s/comm", e->d_name);
        FILE *f = fopen(p, "r");
        int hit = f && fgets(comm, sizeof comm, f) && !strcmp(comm, "ksoftirqd/0\n");
        if (f) fclose(f);
        if (hit) { snprintf(path, sizeof path, "/proc/%s/schedstat", e->d_name); break; }
    }
    if (d) closedir(d);
    FILE *f = fopen(path, "r"); /* first field: nanoseconds on CPU */
    if (f && fscanf(f, "%lld", &ns) != 1) ns = 0;
    if (f) fclose(f);
    return ns / 1e9;
}
static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set)) die("sched_setaffinity");
}

/* Receiver: accept n connections, say "ready", drain until `expect` bytes, report CPU. */
static void receiver(int lfd, int n, long long expect, int out) {
    int ep = epoll_create1(0);
    for (int i = 0; i < n; i++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
        if (fd < 0) die("accept");
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    double c0 = cpu_s();
    if (write(out, "r", 1) != 1) die("write");
    static char buf[1 << 20];
    struct epoll_event evs[256];
    long long got = 0;
    while (got < expect) {
        int k = epoll_wait(ep, evs, 256, 10000);
        if (k <= 0) break; /* 10 s with nothing: bytes went missing */
        for (int i = 0; i < k; i++)
            for (ssize_t r; (r = recv(evs[i].data.fd, buf, sizeof buf, 0)) > 0;) got += r;
    }
    double res[2] = {cpu_s() - c0, (double)got};
    if (write(out, res, sizeof res) != sizeof res) die("write");
    exit(0);
}

/* io_uring, mapped by hand: the SQ ring (tail, mask, index array), CQ ring, SQE array. */
static struct { int fd; unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
                struct io_uring_sqe *sqes; struct io_uring_cqe *cqes; } ring;

static void uring_setup(unsigned entries) {
    struct io_uring_params p = {0};
    /* one thread submits; completions are run when we wait for them, not by interrupts */
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    ring.fd = syscall(__NR_io_uring_setup, entries, &p);
    if (ring.fd < 0) die("io_uring_setup");
    size_t sqsz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cqsz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (cqsz > sqsz) sqsz = cqsz; /* IORING_FEAT_SINGLE_MMAP: one mapping for both rings */
    char *sq = mmap(0, sqsz, RW, MAP_SHARED | MAP_POPULATE, ring.fd, IORING_OFF_SQ_RING);
    ring.sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), RW, MAP_SHARED | MAP_POPULATE,
                     ring.fd, IORING_OFF_SQES);
    if (sq == MAP_FAILED || ring.sqes == MAP_FAILED) die("mmap");
    ring.sq_tail = (unsigned *)(sq + p.sq_off.tail);
    ring.sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    ring.sq_array = (unsigned *)(sq + p.sq_off.array);
    ring.cq_head = (unsigned *)(sq + p.cq_off.head);
    ring.cq_tail = (unsigned *)(sq + p.cq_off.tail);
    ring.cq_mask = (unsigned *)(sq + p.cq_off.ring_mask);
    ring.cqes = (struct io_uring_cqe *)(sq + p.cq_off.cqes);
}

/* One round: an IORING_OP_SEND per socket, one io_uring_enter to submit all and wait. */
static void uring_round(int *fds, int n, const char *msg, int s) {
    unsigned tail = *ring.sq_tail, mask = *ring.sq_mask;
    for (int i = 0; i < n; i++, tail++) {
        struct io_uring_sqe *e = &ring.sqes[tail & mask];
        memset(e, 0, sizeof *e);
        e->opcode = IORING_OP_SEND;
        e->fd = fds[i];
        e->addr = (uintptr_t)msg;
        e->len = s;
        e->msg_flags = MSG_NOSIGNAL | MSG_WAITALL; /* WAITALL: io_uring finishes short sends */
        ring.sq_array[tail & mask] = tail & mask;
    }
    __atomic_store_n(ring.sq_tail, tail, __ATOMIC_RELEASE);
    if (syscall(__NR_io_uring_enter, ring.fd, n, n, IORING_ENTER_GETEVENTS, NULL, 0) != n)
        die("io_uring_enter");
    unsigned head = *ring.cq_head, end = __atomic_load_n(ring.cq_tail, __ATOMIC_ACQUIRE);
    if (end - head != (unsigned)n) fail("uring: %u completions\n", end - head);
    for (; head != end; head++)
        if (ring.cqes[head & *ring.cq_mask].res != s) fail("uring: short send\n");
    __atomic_store_n(ring.cq_head, head, __ATOMIC_RELEASE);
}

/* Zerocopy: read every notification queued on fd. Each says sends [lo, hi] of this socket
 * (numbered from 0: the round number) are done with their buffer. */
static int pending[SLOTS];
static long long zc_copied, zc_notes;
static void zc_reap(int fd) {
    char ctl[128];
    for (;;) {
        struct msghdr m = {.msg_control = ctl, .msg_controllen = sizeof ctl};
        if (recvmsg(fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) return;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
            struct sock_extended_err *e = (struct sock_extended_err *)CMSG_DATA(c);
            if (e->ee_errno != 0 || e->ee_origin != SO_EE_ORIGIN_ZEROCOPY) continue;
            zc_notes++;
            /* COPIED: the kernel copied the data after all (as it does for local delivery) */
            if (e->ee_code & SO_EE_CODE_ZEROCOPY_COPIED) zc_copied++;
            for (uint32_t r = e->ee_info; r != e->ee_data + 1; r++) pending[r % SLOTS]--;
        }
    }
}
/* Block until every socket has released buffer `slot`; EPOLLERR flags a waiting errqueue. */
static void zc_wait(int ep, int slot) {
    struct epoll_event evs[256];
    while (pending[slot] > 0) {
        int k = epoll_wait(ep, evs, 256, 5000);
        if (k <= 0) fail("zerocopy: notifications missing\n");
        for (int i = 0; i < k; i++) zc_reap(evs[i].data.fd);
    }
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: %s send|uring|zerocopy N S R\n", argv[0]); return 2; }
    const char *method = argv[1];
    int n = atoi(argv[2]), s = atoi(argv[3]), rounds = atoi(argv[4]), one = 1;
    int zc = !strcmp(method, "zerocopy"), ur = !strcmp(method, "uring");
    if (!zc && !ur && strcmp(method, "send")) fail("unknown method %s\n", method);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max; /* n sockets on each side: raise the soft limit to the hard */
    setrlimit(RLIMIT_NOFILE, &rl);

    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    if (bind(lfd, (void *)&a, sizeof a) || listen(lfd, n) || getsockname(lfd, (void *)&a, &alen))
        die("listen");
    int pp[2];
    if (pipe(pp)) die("pipe");
    long long expect = (long long)n * s * rounds;
    pid_t pid = fork();
    if (pid == 0) { pin(1); close(pp[0]); receiver(lfd, n, expect, pp[1]); }
    pin(0);
    close(pp[1]);

    /* Sender: n blocking sockets, TCP_NODELAY as a server sets it. */
    int *fds = malloc(n * sizeof *fds), ep = epoll_create1(0);
    for (int i = 0; i < n; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (zc && setsockopt(fds[i], SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one)) die("SO_ZEROCOPY");
        if (connect(fds[i], (void *)&a, sizeof a)) die("connect");
        struct epoll_event ev = {.events = 0, .data.fd = fds[i]}; /* EPOLLERR is always reported */
        if (zc) epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    if (ur) uring_setup(n);
    char *bufs = malloc((size_t)SLOTS * s), ready;
    memset(bufs, 'x', (size_t)SLOTS * s);
    if (read(pp[0], &ready, 1) != 1) die("read"); /* receiver has accepted all n */

    double c0 = cpu_s(), k0 = ksoftirqd0_s(), t0 = now_s();
    for (int r = 0; r < rounds; r++) {
        int slot = r % SLOTS;
        char *msg = bufs + (size_t)slot * s;
        if (ur) { uring_round(fds, n, msg, s); continue; }
        if (zc) { zc_wait(ep, slot); pending[slot] = n; }
        for (int i = 0; i < n; i++)
            if (send(fds[i], msg, s, MSG_NOSIGNAL | (zc ? MSG_ZEROCOPY : 0)) != s) die("send");
    }
    if (zc) for (int k = 0; k < SLOTS; k++) zc_wait(ep, k); /* all buffers released */
    double cpu = cpu_s() - c0, ksirq = ksoftirqd0_s() - k0, wall = now_s() - t0;

    double res[2] = {0, 0};
    if (read(pp[0], res, sizeof res) != sizeof res) die("read");
    waitpid(pid, NULL, 0);
    double msgs = (double)n * rounds;
    printf("method=%s N=%d S=%d R=%d cpu0_us_per_msg=%.3f (sender %.3f + ksoftirqd %.3f)"
           " recv_us_per_msg=%.3f wall_us_per_round=%.0f bytes_ok=%d", method, n, s, rounds,
           (cpu + ksirq) / msgs * 1e6, cpu / msgs * 1e6, ksirq / msgs * 1e6, res[0] / msgs * 1e6,
           wall / rounds * 1e6, res[1] == (double)expect);
    if (zc) printf(" zc_notes=%lld zc_copied=%lld", zc_notes, zc_copied);
    printf("\n");
    return res[1] == (double)expect ? 0 : 1;
}
