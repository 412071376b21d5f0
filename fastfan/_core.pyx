# cython: freethreading_compatible = False
"""The compiled core: channels, subscribers, RFC 6455 checks, encoding and fan-out.

The path of a published message through this file:

    Session.on_ws_frame      RFC 6455 checks, reassembly, UTF-8, then JSON (msgspec)
    Session._publish         permission, rate limit, envelope encoded once
    hub.bus.publish          the bus (embedded or Redis) hands it to every worker's Hub
    Hub.fanout               framed once, appended to each subscriber's OutputBuffer in C
                             (a large frame: queued by reference, copied for nobody)
    Hub._flush               at the end of the loop turn, one sendmsg() per connection

Nothing on that path calls Python per delivery: the per-subscriber loop (`_deliver`) is
plain C over a contiguous array, and each connection costs one syscall per loop turn
however many messages it carries.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.buffer cimport PyBUF_SIMPLE, PyObject_GetBuffer, PyBuffer_Release
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memset
from picows.picows cimport (MemoryBuffer, WSCloseCode, WSFrame, WSListener, WSMsgType,
                            WSTransport)
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

import secrets

import msgspec

from .protocol import decode_request, encode_json

cdef extern from "<sys/socket.h>" nogil:
    int MSG_NOSIGNAL
    struct iovec:
        void*  iov_base
        size_t iov_len
    struct msghdr:
        iovec* msg_iov
        size_t msg_iovlen
    ssize_t sendmsg(int fd, const msghdr* message, int flags)

# Hoehrmann's UTF-8 DFA: one table lookup per byte, and the state carries across
# fragments, so a message split over frames is validated as it arrives.
cdef extern from *:
    """
    static const unsigned char fastfan_utf8d[] = {
      0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
      0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
      0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
      0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
      1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,
      7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,
      8,8,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,
      10,3,3,3,3,3,3,3,3,3,3,3,3,4,3,3,11,6,6,6,5,8,8,8,8,8,8,8,8,8,8,8,
      0,12,24,36,60,96,84,12,12,12,48,72,12,12,12,12,12,12,12,12,12,12,12,12,
      12,0,12,12,12,12,12,0,12,0,12,12,12,24,12,12,12,12,12,24,12,24,12,12,
      12,12,12,12,12,12,12,24,12,12,12,12,12,24,12,12,12,12,12,12,12,24,12,12,
      12,12,12,12,12,12,12,36,12,36,12,12,12,36,12,12,12,12,12,36,12,36,12,12,
      12,36,12,12,12,12,12,12,12,12,12,12,
    };
    #define FASTFAN_UTF8_ACCEPT 0
    #define FASTFAN_UTF8_REJECT 12

    static unsigned int fastfan_utf8_validate(unsigned int state,
                                              const unsigned char* p, Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) {
            state = fastfan_utf8d[256 + state + fastfan_utf8d[p[i]]];
            if (state == FASTFAN_UTF8_REJECT) break;
        }
        return state;
    }
    """
    uint32_t utf8_validate "fastfan_utf8_validate" (uint32_t state, const uint8_t* p,
                                                     Py_ssize_t n) nogil
    uint32_t UTF8_ACCEPT "FASTFAN_UTF8_ACCEPT"
    uint32_t UTF8_REJECT "FASTFAN_UTF8_REJECT"

# Slow-consumer policies, in the order of config.SLOW_CONSUMER_POLICIES.
SLOW_DISCONNECT = 0
SLOW_DROP = 1
SLOW_CONFLATE = 2
cdef dict _POLICY_BY_NAME = {"disconnect": SLOW_DISCONNECT, "drop": SLOW_DROP,
                             "conflate": SLOW_CONFLATE}

# Close codes of the contract that picows's enum does not name.
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_SLOW_CONSUMER = 4008
CLOSE_RATE_LIMITED = 4029

# A peer that does not answer our CLOSE within this many seconds is disconnected.
cdef double CLOSE_TIMEOUT = 5.0
# A client refused for publishing too fast for this long, without pause, is closed (4029).
cdef double RATE_LIMIT_PATIENCE = 1.0
# A buffer up to this size is kept from one loop turn to the next while a connection is
# busy (no malloc per turn); the heartbeat sweep frees it once the connection is idle.
cdef Py_ssize_t KEEP_BUFFER_BYTES = 65536
# picows gives every transport a 1 KiB buffer for framing what picows itself sends; we
# send only small control frames through it (it grows when needed), so start it small.
cdef Py_ssize_t PICOWS_WRITE_BUFFER = 64
# A frame this large is not copied into each subscriber's OutputBuffer: every subscriber
# queues a reference to one bytes object and the writes gather them (sendmsg). With 16 KiB
# data the copies were most of the cost, and while subscribers lagged, the growing buffers'
# realloc copies and page faults made the server slower the further behind it was (half of
# 100k deliveries/s; by reference, all of 200k/s). With 2 KB data, copying cost the same.
cdef Py_ssize_t SHARED_FRAME_BYTES = 4096
cdef enum:
    # At most this many buffers per sendmsg(); the rest go to the transport as they are.
    SHARED_IOV_MAX = 64
# The largest WebSocket frame header a server writes (no mask).
cdef Py_ssize_t MAX_HEADER = 10
cdef Py_ssize_t MAX_CHANNEL_LENGTH = 255

# Channel names: 1–255 characters from A–Z a–z 0–9 _ - . : @ /
cdef bint[128] CHANNEL_CHAR
for _c in range(128):
    CHANNEL_CHAR[_c] = (chr(_c).isascii() and chr(_c).isalnum()) or chr(_c) in "_-.:@/"

cdef bytes MESSAGE_PREFIX = b'{"type":"message","channel":"'

# What bus.publish answers (fastfan.bus: REFUSED, DONE, PENDING).
cdef enum:
    BUS_REFUSED = 0
    BUS_DONE = 1
    BUS_PENDING = 2

# Upper bounds (seconds) of fastfan_publish_latency_seconds's buckets; +Inf is implied.
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5, 5.0)
cdef enum:
    N_BOUNDS = 15  # len(LATENCY_BOUNDS); Histogram's arrays in _core.pxd have this size
    # How many message handling times the per-minute stats keep for their percentiles.
    MAX_SAMPLES = 65536


cdef inline int64_t now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline Py_ssize_t write_header(char* p, uint8_t opcode, Py_ssize_t n) noexcept nogil:
    """Write a final, unmasked frame header for an n-byte payload; return its length."""
    cdef int i
    p[0] = <char>(0x80 | opcode)
    if n < 126:
        p[1] = <char>n
        return 2
    if n < 65536:
        p[1] = 126
        p[2] = <char>(n >> 8)
        p[3] = <char>(n & 0xFF)
        return 4
    p[1] = 127
    for i in range(8):
        p[2 + i] = <char>((n >> (56 - 8 * i)) & 0xFF)
    return 10


cdef inline bint is_valid_close_code(int code) noexcept:
    """Codes a peer may send (RFC 6455 7.4): the defined ones below 3000, and 3000-4999."""
    if 3000 <= code <= 4999:
        return True
    return 1000 <= code <= 1014 and code not in (1004, 1005, 1006)


cpdef bint is_valid_channel(str channel):
    cdef Py_ssize_t n = len(channel)
    cdef Py_UCS4 c
    if n < 1 or n > MAX_CHANNEL_LENGTH:
        return False
    for c in channel:
        if c >= 128 or not CHANNEL_CHAR[c]:
            return False
    return True


@cython.final
cdef class OutputBuffer:
    def __dealloc__(self):
        free(self.data)

    cdef int append(self, const char* ptr, Py_ssize_t n) except -1:
        cdef Py_ssize_t needed = self.size + n
        cdef Py_ssize_t capacity
        cdef char* grown
        if n <= 0:
            return 0
        if needed > self.capacity:
            capacity = max(needed, 2 * self.capacity, 256)
            grown = <char*>realloc(self.data, capacity)
            if grown == NULL:
                raise MemoryError()
            self.data = grown
            self.capacity = capacity
        memcpy(self.data + self.size, ptr, n)
        self.size = needed
        return 0

    cdef void clear(self) noexcept:
        """Empty the buffer, keeping its memory for the next loop turn (unless it is big)."""
        self.size = 0
        if self.capacity > KEEP_BUFFER_BYTES:
            self.release()

    cdef void release(self) noexcept:
        """Empty the buffer and give its memory back."""
        self.size = 0
        self.capacity = 0
        free(self.data)
        self.data = NULL


@cython.final
cdef class Histogram:
    """Counts per bucket of LATENCY_BOUNDS (the last is +Inf), their sum and count."""

    def __cinit__(self):
        cdef int i
        for i in range(N_BOUNDS):
            self.bounds[i] = LATENCY_BOUNDS[i]

    cdef void observe(self, double value) noexcept:
        cdef int i = 0
        while i < N_BOUNDS and value > self.bounds[i]:
            i += 1
        self.counts[i] += 1
        self.total += value
        self.count += 1

    def buckets(self):
        """Counts per bucket, not cumulative: N_BOUNDS + 1 of them."""
        return [self.counts[i] for i in range(N_BOUNDS + 1)]


@cython.final
cdef class Samples:
    """Durations for the seed's per-minute stats line: count, min, max, avg, p95, p99."""

    def __cinit__(self):
        self.values = []

    cdef void record(self, double value) noexcept:
        if self.count == 0 or value < self.minimum:
            self.minimum = value
        if value > self.maximum:
            self.maximum = value
        self.count += 1
        self.total += value
        if len(self.values) < MAX_SAMPLES:
            try:
                self.values.append(value)
            except MemoryError:
                pass

    def take(self):
        """The figures since the last take, in milliseconds; then start again."""
        ordered = sorted(self.values)
        figures = {"count": self.count, "min_ms": 0.0, "max_ms": 0.0, "avg_ms": 0.0,
                   "p95_ms": 0.0, "p99_ms": 0.0}
        if self.count:
            figures.update(min_ms=self.minimum * 1e3, max_ms=self.maximum * 1e3,
                           avg_ms=self.total / self.count * 1e3,
                           p95_ms=ordered[int(0.95 * (len(ordered) - 1))] * 1e3,
                           p99_ms=ordered[int(0.99 * (len(ordered) - 1))] * 1e3)
        self.values = []
        self.count = 0
        self.total = self.minimum = self.maximum = 0
        return figures


@cython.final
cdef class Channel:
    def __cinit__(self, str name):
        self.name = name

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.count):
            Py_DECREF(<object>self.subscribers[i])
        free(self.subscribers)

    def __len__(self):
        return self.count

    cdef Py_ssize_t add(self, Session session) except -1:
        cdef Py_ssize_t capacity
        cdef void** grown
        if self.count == self.capacity:
            capacity = max(8, 2 * self.capacity)
            grown = <void**>realloc(self.subscribers, capacity * sizeof(void*))
            if grown == NULL:
                raise MemoryError()
            self.subscribers = grown
            self.capacity = capacity
        Py_INCREF(session)
        self.subscribers[self.count] = <void*>session
        self.count += 1
        return self.count - 1

    cdef Session remove_at(self, Py_ssize_t slot):
        """Remove the subscriber in `slot` by moving the last one into it.

        Returns the session that moved (its slot is now `slot`), or None.
        """
        cdef Session removed = <Session>self.subscribers[slot]
        cdef Session moved = None
        self.count -= 1
        if slot != self.count:
            self.subscribers[slot] = self.subscribers[self.count]
            moved = <Session>self.subscribers[slot]
        Py_DECREF(removed)
        return moved


@cython.final
cdef class Hub:
    """One worker's channels and connections; the bus calls `fanout` for every message."""

    def __cinit__(self, loop, *, Py_ssize_t max_message_size, Py_ssize_t max_subscriptions,
                  Py_ssize_t max_buffer, double publish_rate, str slow_consumer):
        self.loop = loop
        self.channels = {}
        self.sessions = set()
        self.pending = []
        self.max_message_size = max_message_size
        self.max_subscriptions = max_subscriptions
        self.max_buffer = max_buffer
        self.publish_rate = publish_rate
        self.slow_consumer = _POLICY_BY_NAME[slow_consumer]
        self.client_id_prefix = secrets.token_hex(6).encode() + b"-"
        self.publish_latency = Histogram()
        self.handling = Samples()

    def __dealloc__(self):
        free(self.frame)
        free(self.fanout_started)

    @property
    def connections(self):
        return len(self.sessions)

    @property
    def subscriptions(self):
        cdef Channel channel
        return sum([channel.count for channel in self.channels.values()])

    cdef bytes _new_client_id(self):
        self.next_client_number += 1
        return self.client_id_prefix + (b"%x" % self.next_client_number)

    def encode_message(self, str channel, data, bytes sender):
        """The `message` object subscribers receive: `data` is copied byte for byte."""
        return b"".join((MESSAGE_PREFIX, channel.encode("ascii"), b'","data":', data,
                         b',"from":"', sender, b'","timestamp":', b"%d}" % now_ms()))

    cpdef Py_ssize_t fanout(self, str channel, object payload) except -1:
        """Deliver an encoded `message` to this worker's subscribers of `channel`.

        The payload is framed once into a scratch buffer; each subscriber gets a memcpy.
        Returns the number of subscribers it was queued for.
        """
        cdef Channel target = self.channels.get(channel)
        cdef Py_buffer view
        cdef Py_ssize_t header, size
        cdef char* grown
        cdef bytes shared
        cdef char shared_header[10]  # MAX_HEADER
        if target is None or target.count == 0:
            return 0
        self._note_fanout(monotonic())
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            if view.len >= SHARED_FRAME_BYTES:
                header = write_header(shared_header, WSMsgType.TEXT, view.len)
                shared = PyBytes_FromStringAndSize(NULL, header + view.len)
                memcpy(PyBytes_AS_STRING(shared), shared_header, header)
                memcpy(PyBytes_AS_STRING(shared) + header, view.buf, view.len)
                return self._deliver_shared(target, shared)
            size = view.len + MAX_HEADER
            if size > self.frame_capacity:
                grown = <char*>realloc(self.frame, size)
                if grown == NULL:
                    raise MemoryError()
                self.frame = grown
                self.frame_capacity = size
            header = write_header(self.frame, WSMsgType.TEXT, view.len)
            memcpy(self.frame + header, view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return self._deliver(target, self.frame, header + view.len)

    cdef int _note_fanout(self, double started) except -1:
        """Remember when a fan-out began; the flush that writes it measures the latency."""
        cdef double* grown
        cdef Py_ssize_t capacity
        if self.fanout_count == self.fanout_capacity:
            capacity = max(64, 2 * self.fanout_capacity)
            grown = <double*>realloc(self.fanout_started, capacity * sizeof(double))
            if grown == NULL:
                raise MemoryError()
            self.fanout_started = grown
            self.fanout_capacity = capacity
        self.fanout_started[self.fanout_count] = started
        self.fanout_count += 1
        return 0

    cdef int _deliver(self, Channel channel, const char* frame, Py_ssize_t size) except -1:
        cdef Py_ssize_t i
        cdef Py_ssize_t limit = self.max_buffer
        for i in range(channel.count):
            if (<Session>channel.subscribers[i]).queue(frame, size, limit):
                self._overflow(<Session>channel.subscribers[i], channel, frame, size)
        self.deliveries_total += channel.count
        return channel.count

    cdef int _deliver_shared(self, Channel channel, bytes frame) except -1:
        cdef Py_ssize_t i
        cdef Py_ssize_t limit = self.max_buffer
        for i in range(channel.count):
            if (<Session>channel.subscribers[i]).queue_shared(frame, limit):
                self._overflow(<Session>channel.subscribers[i], channel,
                               PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
        self.deliveries_total += channel.count
        return channel.count

    cdef int _overflow(self, Session session, Channel channel, const char* frame,
                       Py_ssize_t size) except -1:
        """A subscriber's queue is past --max-buffer: apply the slow-consumer policy."""
        self.deliveries_total -= 1
        if session.closing:
            return 0
        if self.slow_consumer == SLOW_DISCONNECT:
            self.slow_consumers_disconnected_total += 1
            session._discard_output()
            session.close(CLOSE_SLOW_CONSUMER, "slow consumer")
        elif self.slow_consumer == SLOW_DROP:
            session.overflowing = True
            self.dropped_slow_total += 1
        else:
            session.overflowing = True
            if session.conflated is None:
                session.conflated = {}
            elif channel.name in session.conflated:
                self.dropped_conflated_total += 1
            session.conflated[channel.name] = PyBytes_FromStringAndSize(frame, size)
        return 0

    cdef int _schedule(self, Session session) except -1:
        session.scheduled = True
        self.pending.append(session)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        return 0

    def _flush(self):
        """End of the loop turn: write each connection's queued frames in one sendmsg()."""
        cdef Session session
        cdef list pending = self.pending
        self.pending = []
        self.flush_scheduled = False
        cdef Py_ssize_t i
        cdef double written
        for session in pending:
            session.scheduled = False
            session.write_out()
        written = monotonic()
        for i in range(self.fanout_count):
            self.publish_latency.observe(written - self.fanout_started[i])
        self.fanout_count = 0

    def stats(self):
        """This worker's figures, for /metrics."""
        return {
            "connections": len(self.sessions),
            "connections_total": self.connections_total,
            "channels": len(self.channels),
            "subscriptions": self.subscriptions,
            "messages_received_total": self.messages_received_total,
            "deliveries_total": self.deliveries_total,
            "bytes_sent_total": self.bytes_sent_total,
            "dropped_slow_total": self.dropped_slow_total,
            "dropped_conflated_total": self.dropped_conflated_total,
            "slow_consumers_disconnected_total": self.slow_consumers_disconnected_total,
            "publish_refused_total": self.publish_refused_total,
        }

    def sweep(self, double ping_interval, double ping_timeout):
        """The periodic heartbeat, one pass over every connection (no timer per connection).

        Silent for `ping_interval`: ping once. Silent for `ping_timeout`: close 1001.
        A token whose exp has passed: close 4001.
        """
        cdef Session session
        cdef double now = monotonic()
        cdef double wall = now_ms() / 1000.0
        cdef double silent
        for session in list(self.sessions):
            if session.closing:
                continue
            if session.expires_at and wall >= session.expires_at:
                session.close(CLOSE_TOKEN_EXPIRED, "token expired")
                continue
            if session.out.size == 0:
                session.out.release()  # empty now: an idle connection holds no buffer
                                       # (a busy one pays one malloc per sweep)
            silent = now - session.last_seen
            if silent >= ping_timeout:
                session.close(WSCloseCode.GOING_AWAY, "heartbeat timeout")
            elif silent >= ping_interval and session.pinged_at < session.last_seen:
                session.pinged_at = now
                session._queue_frame(WSMsgType.PING, NULL, 0)

    def close_all(self, int code, str reason):
        """Send every connection a CLOSE (shutdown); they disconnect as peers answer."""
        cdef Session session
        for session in list(self.sessions):
            session.close(code, reason)

    # Channel table --------------------------------------------------------------------

    cdef int _subscribe(self, Session session, str name) except -1:
        cdef Channel channel = self.channels.get(name)
        if channel is None:
            channel = Channel(name)
            self.channels[name] = channel
            self.bus.subscribe(name)
        session.subscriptions[name] = channel.add(session)
        return 0

    cdef int _unsubscribe(self, Session session, str name) except -1:
        cdef Channel channel = self.channels[name]
        cdef Py_ssize_t slot = session.subscriptions.pop(name)
        cdef Session moved = channel.remove_at(slot)
        if moved is not None:
            moved.subscriptions[name] = slot
        if channel.count == 0:
            del self.channels[name]
            self.bus.unsubscribe(name)
        return 0


# Replies the server sends often enough to build once.
cdef bytes PONG = b'{"type":"pong"}'


cdef bytes _reply(bytes kind, str channel, bytes request_id):
    """`{"type":kind,"channel":channel[,"id":id]}`; channel names need no escaping."""
    cdef bytes body = b'{"type":"' + kind + b'","channel":"' + channel.encode("ascii") + b'"'
    if request_id:
        body += b',"id":' + request_id
    return body + b"}"


cdef bytes _error(int code, str message, bytes request_id):
    cdef bytes body = b'{"type":"error","code":%d,"message":%s' % (code, encode_json(message))
    if request_id:
        body += b',"id":' + request_id
    return body + b"}"


@cython.final
cdef class Session(WSListener):
    """One WebSocket connection: frames in, RFC 6455 rules and limits, replies out."""

    def __cinit__(self, Hub hub, identity, bint echo=False):
        self.hub = hub
        self.identity = identity
        self.echo = echo
        self.out = OutputBuffer()
        self.subscriptions = {}
        self.tokens = 2 * hub.publish_rate
        self.fd = -1
        self.expires_at = identity.expires_at or 0

    # picows callbacks -----------------------------------------------------------------

    cpdef on_ws_connected(self, WSTransport transport):
        cdef Hub hub = self.hub
        self.transport = transport
        # Memory per idle connection: the parsed upgrade request and response (header
        # dicts) are not needed once connected, and picows's framing buffer can start small.
        transport.request = None
        transport.response = None
        transport._write_buffer = MemoryBuffer(PICOWS_WRITE_BUFFER)
        tcp = transport.underlying_transport
        # Any byte left unsent makes the transport pause us, and resume us once it has
        # written everything: so while not paused, our own sendmsg() cannot jump the queue.
        tcp.set_write_buffer_limits(0, 0)
        self.paused = tcp.get_write_buffer_size() > 0
        self.fd = tcp.get_extra_info("socket").fileno()
        self.client_id = hub._new_client_id()
        self.last_seen = monotonic()
        self.refill_at = self.last_seen
        hub.sessions.add(self)
        hub.connections_total += 1
        if not self.echo:
            welcome = b'{"type":"welcome","data":{"clientId":"%s","user":%s,"timestamp":%d}}' % (
                self.client_id, encode_json(self.identity.user), now_ms())
            self.send_text(welcome, len(welcome))

    cpdef on_ws_disconnected(self, WSTransport transport):
        cdef Hub hub = self.hub
        cdef str name
        hub.sessions.discard(self)
        for name in list(self.subscriptions):
            hub._unsubscribe(self, name)
        self._discard_output()
        self.fragments = None
        self.conflated = None
        self.closing = True

    cpdef pause_writing(self):
        self.paused = True

    cpdef resume_writing(self):
        self.paused = False
        self.backlog = 0
        if (self.out.size or self.shared is not None or self.overflowing) and \
                not self.scheduled and not self.closing:
            self.hub._schedule(self)

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType kind = frame.msg_type
        self.last_seen = monotonic()
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            if not self.closing:
                self.close(WSCloseCode.PROTOCOL_ERROR, "reserved bits set without an extension")
            return
        if kind == WSMsgType.CLOSE:
            self._on_close_frame(frame)
            return
        if self.closing:
            return
        if kind == WSMsgType.PING:
            # Answered here, not by picows, so that the RSV check above applies and the
            # pong keeps its place behind the frames already queued.
            self._queue_frame(WSMsgType.PONG, frame.payload_ptr, frame.payload_size)
            return
        if kind == WSMsgType.PONG:
            return  # only proves the peer alive (last_seen)
        if kind == WSMsgType.CONTINUATION:
            self._on_continuation(frame)
            return
        if self.fragment_type:
            self.close(WSCloseCode.PROTOCOL_ERROR, "new message before the last one ended")
            return
        if kind == WSMsgType.BINARY and not self.echo:
            self.close(WSCloseCode.UNSUPPORTED_DATA, "binary frames are not accepted")
            return
        if kind == WSMsgType.TEXT:
            self.utf8_state = utf8_validate(UTF8_ACCEPT, <uint8_t*>frame.payload_ptr,
                                            frame.payload_size)
            if self.utf8_state == UTF8_REJECT:
                self.close(WSCloseCode.INVALID_TEXT, "text is not valid UTF-8")
                return
        if frame.fin:
            if kind == WSMsgType.TEXT and self.utf8_state != UTF8_ACCEPT:
                self.close(WSCloseCode.INVALID_TEXT, "text is not valid UTF-8")
                return
            self._on_message(kind, frame.payload_ptr, frame.payload_size)
            return
        self.fragment_type = kind
        self.fragments = OutputBuffer()
        self.fragments.append(frame.payload_ptr, frame.payload_size)

    cdef int _on_continuation(self, WSFrame frame) except -1:
        cdef OutputBuffer message
        cdef int kind
        if not self.fragment_type:
            self.close(WSCloseCode.PROTOCOL_ERROR, "continuation frame without a message")
            return 0
        if self.fragments.size + frame.payload_size > self.hub.max_message_size:
            self.close(WSCloseCode.MESSAGE_TOO_BIG, "message too big")
            return 0
        if self.fragment_type == WSMsgType.TEXT:
            self.utf8_state = utf8_validate(self.utf8_state, <uint8_t*>frame.payload_ptr,
                                            frame.payload_size)
            if self.utf8_state == UTF8_REJECT or (frame.fin and self.utf8_state != UTF8_ACCEPT):
                self.close(WSCloseCode.INVALID_TEXT, "text is not valid UTF-8")
                return 0
        self.fragments.append(frame.payload_ptr, frame.payload_size)
        if frame.fin:
            message = self.fragments
            kind = self.fragment_type
            self.fragments = None
            self.fragment_type = 0
            self._on_message(kind, message.data, message.size)
        return 0

    cdef int _on_close_frame(self, WSFrame frame) except -1:
        """Answer the peer's CLOSE with its own code, then hang up."""
        cdef int code = frame.get_close_code() if frame.payload_size >= 2 else WSCloseCode.OK
        if not self.closing:
            if is_valid_close_code(code):
                self._send_close(code, "")
            else:
                self._send_close(WSCloseCode.PROTOCOL_ERROR, "invalid close code")
        self.transport.disconnect()
        return 0

    # Messages --------------------------------------------------------------------------

    cdef int _on_message(self, int kind, const char* payload, Py_ssize_t size) except -1:
        cdef Hub hub = self.hub
        cdef double started
        if self.echo:
            self._queue_frame(kind, payload, size)
            return 0
        started = monotonic()
        hub.messages_received_total += 1
        try:
            self._handle(payload, size)
        finally:
            hub.handling.record(monotonic() - started)
        return 0

    cdef int _handle(self, const char* payload, Py_ssize_t size) except -1:
        cdef bytes request_id = b""
        try:
            request = decode_request(PyBytes_FromStringAndSize(payload, size))
        except msgspec.ValidationError as exc:
            return self._send_error(400, f"invalid message: {exc}", b"")
        except msgspec.DecodeError as exc:
            return self._send_error(400, f"invalid JSON: {exc}", b"")
        except RecursionError:
            return self._send_error(400, "invalid JSON: nested too deeply", b"")
        if request.id:
            request_id = bytes(request.id)
        kind_name = request.type
        if kind_name == "publish":
            return self._publish(request, request_id)
        if kind_name == "ping":
            if request_id:
                return self._send_bytes(b'{"type":"pong","id":' + request_id + b"}")
            return self._send_bytes(PONG)
        if kind_name == "subscribe":
            return self._subscribe(request.channel, request_id)
        if kind_name == "unsubscribe":
            return self._unsubscribe(request.channel, request_id)
        return self._send_error(400, f"unknown message type {kind_name!r}", request_id)

    cdef int _check_channel(self, channel, bytes request_id) except -1:
        """1 when `channel` is a valid name; else an error is sent and 0 returned."""
        if channel is None:
            self._send_error(400, "missing 'channel'", request_id)
            return 0
        if not is_valid_channel(channel):
            self._send_error(400, "invalid channel name: 1-255 characters from "
                             "A-Z a-z 0-9 _ - . : @ /", request_id)
            return 0
        return 1

    cdef int _subscribe(self, channel, bytes request_id) except -1:
        if not self._check_channel(channel, request_id):
            return 0
        if not self.identity.subscribe.allows(channel):
            return self._send_error(403, f"not permitted to subscribe to {channel}", request_id)
        if channel not in self.subscriptions:
            if len(self.subscriptions) >= self.hub.max_subscriptions:
                return self._send_error(
                    429, f"subscription limit reached ({self.hub.max_subscriptions})", request_id)
            self.hub._subscribe(self, channel)
        return self._send_bytes(_reply(b"subscribed", channel, request_id))

    cdef int _unsubscribe(self, channel, bytes request_id) except -1:
        if not self._check_channel(channel, request_id):
            return 0
        if channel in self.subscriptions:
            self.hub._unsubscribe(self, channel)
        return self._send_bytes(_reply(b"unsubscribed", channel, request_id))

    cdef int _publish(self, request, bytes request_id) except -1:
        cdef Hub hub = self.hub
        channel = request.channel
        if not self._check_channel(channel, request_id):
            return 0
        if not request.data:
            return self._send_error(400, "publish needs 'data'", request_id)
        if not self.identity.publish.allows(channel):
            return self._send_error(403, f"not permitted to publish to {channel}", request_id)
        if not self._take_token():
            hub.publish_refused_total += 1
            if self.refused_since and monotonic() - self.refused_since > RATE_LIMIT_PATIENCE:
                self.close(CLOSE_RATE_LIMITED, "publish rate limit exceeded")
                return 0
            return self._send_error(429, f"publish rate limit ({hub.publish_rate:g}/s) exceeded",
                                    request_id)
        payload = hub.encode_message(channel, request.data, self.client_id)
        outcome = hub.bus.publish(channel, payload, self if request_id else None, request_id)
        if outcome == BUS_REFUSED:
            return self._send_error(503, "message bus unavailable, try again", request_id)
        if outcome == BUS_DONE and request_id:
            return self._send_bytes(_reply(b"published", channel, request_id))
        return 0  # BUS_PENDING: the bus calls acknowledge() once it knows

    def acknowledge(self, str channel, bytes request_id, bint ok):
        """The bus's late answer to a publish that asked for one (an `id`)."""
        if ok:
            self._send_bytes(_reply(b"published", channel, request_id))
        else:
            self._send_error(503, "message bus unavailable; the message was not published",
                             request_id)

    cdef bint _take_token(self):
        """Token bucket: `publish_rate` per second, bursts of twice that."""
        cdef double now = monotonic()
        cdef double burst = 2 * self.hub.publish_rate
        self.tokens = min(burst, self.tokens + (now - self.refill_at) * self.hub.publish_rate)
        self.refill_at = now
        if self.tokens >= 1:
            self.tokens -= 1
            if self.tokens >= burst - 1:
                self.refused_since = 0  # the client slowed down: forgive past refusals
            return True
        if not self.refused_since:
            self.refused_since = now
        return False

    # Output ----------------------------------------------------------------------------

    cdef int _send_error(self, int code, str message, bytes request_id) except -1:
        return self._send_bytes(_error(code, message, request_id))

    cdef int _send_bytes(self, bytes payload) except -1:
        return self.send_text(PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))

    cdef inline Py_ssize_t _queued(self) noexcept:
        """Bytes queued for this connection: copied, by reference, and left with the transport."""
        return self.out.size + self.shared_size + self.backlog

    cdef inline bint _refuses(self, Py_ssize_t size, Py_ssize_t limit) noexcept:
        """Whether a message of `size` must go to the slow-consumer policy instead."""
        return self.overflowing or self.closing or self._queued() + size > limit

    cdef inline bint queue(self, const char* frame, Py_ssize_t size, Py_ssize_t limit) except -1:
        """Append a framed message for this subscriber; 1 when the slow-consumer policy must
        decide instead (past --max-buffer, already overflowing, or closing)."""
        if self._refuses(size, limit):
            return 1
        self.out.append(frame, size)
        if not self.scheduled:
            self.hub._schedule(self)
        return 0

    cdef inline bint queue_shared(self, bytes frame, Py_ssize_t limit) except -1:
        """queue() for a large frame: a reference to it, after whatever is queued already."""
        cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
        if self._refuses(size, limit):
            return 1
        if self.shared is None:
            self.shared = []
        if self.out.size:  # the order on the wire: what `out` holds goes first
            self.shared.append(PyBytes_FromStringAndSize(self.out.data, self.out.size))
            self.shared_size += self.out.size
            self.out.clear()
        self.shared.append(frame)
        self.shared_size += size
        if not self.scheduled:
            self.hub._schedule(self)
        return 0

    cdef int _discard_output(self) except -1:
        self.out.release()
        self.shared = None
        self.shared_size = 0
        return 0

    cdef int send_text(self, const char* payload, Py_ssize_t size) except -1:
        return self._queue_frame(WSMsgType.TEXT, payload, size)

    cdef int _queue_frame(self, int opcode, const char* payload, Py_ssize_t size) except -1:
        """Queue one frame of our own (a reply) behind whatever is already queued."""
        cdef char header[10]
        if self.closing:
            return 0
        if self._queued() + size > self.hub.max_buffer:
            # The client sends requests but does not read the answers.
            self.hub.slow_consumers_disconnected_total += 1
            self._discard_output()
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer")
            return 0
        self.out.append(header, write_header(header, opcode, size))
        self.out.append(payload, size)
        if not self.scheduled:
            self.hub._schedule(self)
        return 0

    cdef int write_out(self) except -1:
        """Hand the queued frames to the kernel: one send; the rest goes to the transport."""
        if self.paused or self.closing or self.fd < 0:
            return 0
        if self.transport.is_close_frame_sent:
            # picows sent CLOSE itself, for a protocol error it found parsing one frame
            # ahead of us. Nothing may follow a CLOSE (RFC 6455 5.5.1), not even the replies
            # to the good frames before the bad one.
            self.closing = True
            self._discard_output()
            return 0
        if (self.shared is not None or self.out.size) and self._send_queued():
            return 0  # the peer is gone
        if self.overflowing and not self.paused:
            self._drained()
        return 0

    cdef bint _send_queued(self) except -1:
        """One sendmsg() of the large frames queued by reference, then `out`. What the kernel
        does not take goes to the transport (the frames still by reference), which pauses
        us until it is written. 1 when the peer is gone."""
        cdef iovec iov[SHARED_IOV_MAX]
        cdef msghdr message
        cdef list shared = self.shared
        cdef OutputBuffer out = self.out
        cdef Py_ssize_t count = 0, total = self.shared_size + out.size, size
        cdef bint out_included = True
        cdef ssize_t sent
        cdef bytes segment
        if shared is not None:
            for segment in shared:
                if count == SHARED_IOV_MAX - 1:
                    out_included = False
                    break
                iov[count].iov_base = PyBytes_AS_STRING(segment)
                iov[count].iov_len = PyBytes_GET_SIZE(segment)
                count += 1
        if out_included and out.size:
            iov[count].iov_base = out.data
            iov[count].iov_len = out.size
            count += 1
        memset(&message, 0, sizeof(message))
        message.msg_iov = iov
        message.msg_iovlen = count
        while True:
            sent = sendmsg(self.fd, &message, MSG_NOSIGNAL)
            if sent >= 0 or errno != EINTR:
                break
        if sent < 0 and errno != EAGAIN:  # EWOULDBLOCK is EAGAIN on Linux
            self._discard_output()  # the transport reports the loss and we clean up
            self.transport.disconnect(False)
            return 1
        self.hub.bytes_sent_total += total
        if sent < 0:
            sent = 0
        self.shared = None
        self.shared_size = 0
        if sent < total:
            rest = []
            if shared is not None:
                for segment in shared:
                    size = PyBytes_GET_SIZE(segment)
                    if sent >= size:
                        sent -= size
                        continue
                    rest.append(memoryview(segment)[sent:] if sent else segment)
                    sent = 0
            if out.size > sent:  # `out` was not in this sendmsg() or only part of it
                rest.append(PyBytes_FromStringAndSize(out.data + sent, out.size - sent))
            tcp = self.transport.underlying_transport
            tcp.writelines(rest)
            self.backlog = tcp.get_write_buffer_size()
            self.paused = self.backlog > 0
        out.clear()
        return 0

    cdef int _drained(self) except -1:
        """Everything queued is written: end the policy, send what `conflate` kept."""
        cdef bytes frame
        self.overflowing = False
        if self.conflated:
            for frame in self.conflated.values():
                self.out.append(PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
            self.hub.deliveries_total += len(self.conflated)
            self.conflated = None
            if not self.scheduled:
                self.hub._schedule(self)
        return 0

    cdef int _write_all(self) except -1:
        """Before a CLOSE: everything queued goes out, paused or not (bounded by --max-buffer)."""
        if self.transport is not None and not self.transport.is_close_frame_sent:
            if self.shared is not None:
                self.hub.bytes_sent_total += self.shared_size
                self.transport.underlying_transport.writelines(self.shared)
            if self.out.size:
                self.hub.bytes_sent_total += self.out.size
                self.transport.underlying_transport.write(
                    PyBytes_FromStringAndSize(self.out.data, self.out.size))
        self._discard_output()
        return 0

    cdef int _send_close(self, int code, str reason) except -1:
        """Flush what is queued, then CLOSE; from here on only the peer's CLOSE matters."""
        self._write_all()
        self.closing = True
        self.transport.send_close(<WSCloseCode>code, reason.encode())
        return 0

    cpdef close(self, int code, str reason):
        """Start the closing handshake; disconnect if the peer does not answer in time."""
        if self.closing or self.transport is None:
            return
        self._send_close(code, reason)
        self.hub.loop.call_later(CLOSE_TIMEOUT, (<object>self.transport).disconnect)

    def __repr__(self):
        return f"<Session {self.client_id!r} user={self.identity.user!r}>"
