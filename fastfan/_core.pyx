# cython: freethreading_compatible = False
"""The compiled core: channels, subscribers, RFC 6455 checks, encoding and fan-out.

The path of a published message through this module:

    Session.on_ws_frame      RFC 6455 checks, reassembly, UTF-8, then JSON (msgspec)
    Session._publish         permission, rate limit, envelope encoded once
    hub.bus.publish          the bus (embedded or Redis) hands it to every worker's Hub
    Hub.fanout               framed once, appended to each subscriber's Outbox in C
                             (a large frame: queued by reference, copied for nobody)
    Hub._flush               at the end of the loop turn, one send per connection

Nothing on that path calls Python per delivery: the per-subscriber loop (`Hub._deliver`)
is plain C over a contiguous array, and each connection costs one syscall per loop turn
however many messages it carries.

One extension, four parts included below (as uvloop splits its loop):
    _deflate.pxi   Deflate: permessage-deflate, one compressor and inflater per worker
    _outbox.pxi    Outbox: what goes out to a connection (queue, slow-consumer policy, writes)
    _session.pxi   Session(Outbox): what comes in (frames, RFC rules, requests, limits)
    _hub.pxi       Channel and Hub: the channel table, fan-out, the flush, the sweep
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.buffer cimport PyBUF_SIMPLE, PyObject_GetBuffer, PyBuffer_Release
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.stdio cimport snprintf
from libc.string cimport memcmp, memcpy, memmove, memset
from fastfan._picows.picows cimport (MemoryBuffer, WSCloseCode, WSFrame, WSListener,
                                    WSMsgType, WSTransport)
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

import functools
from types import CoroutineType
import logging
import hashlib
import secrets

import msgspec

from . import errors
from .auth import AuthError
from .history import BYTES_PER_PUBLISH, CHANNEL_COST, READ_RATE
from .history import DEFAULT_MAX_BYTES as DEFAULT_HISTORY_MAX_BYTES
from .history import MAX_POSITION, position
from .protocol import Recover, decode_request, encode_json

log = logging.getLogger("fastfan")

cdef extern from "<sys/socket.h>" nogil:
    int MSG_NOSIGNAL
    struct iovec:
        void*  iov_base
        size_t iov_len
    struct msghdr:
        iovec* msg_iov
        size_t msg_iovlen
    ssize_t sendmsg(int fd, const msghdr* message, int flags)
    ssize_t send(int fd, const void* buffer, size_t size, int flags)

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
# An incomplete fragmented message is given up (close 1008) when its first frame is this
# many seconds old: otherwise a connection could hold up to --max-message-size for ever.
cdef double FRAGMENT_TIMEOUT = 10.0
# A frame this large is not copied into each subscriber's OutputBuffer: every subscriber
# queues a reference to one bytes object and the writes gather them (sendmsg). With 16 KiB
# data the copies were most of the cost, and while subscribers lagged, the growing buffers'
# realloc copies and page faults made the server slower the further behind it was (half of
# 100k deliveries/s; by reference, all of 200k/s). With 2 KB data, copying cost the same.
cdef Py_ssize_t SHARED_FRAME_BYTES = 4096
cdef enum:
    # At most this many buffers per sendmsg(); the rest go to the transport as they are.
    SHARED_IOV_MAX = 64
    # The flush looks at the clock after every this many writes (see FLUSH_SLICE_SECONDS).
    FLUSH_CLOCK_EVERY = 16
# The flush writes for at most about this long, then lets the loop read before it goes on
# with the connections not yet written. A message that arrives meanwhile is appended to
# them at once, so it reaches every connection within one pass over them: writing every
# connection before reading again (the yardstick's turn), it would first wait for the pass
# in progress to end, then take a whole pass.
cdef double FLUSH_SLICE_SECONDS = 0.0005
# --max-backlog's default: output the server has queued and not yet written, past which
# it reads no more input until half of it is (Hub.hold_input).
DEFAULT_MAX_BACKLOG = 64 << 20
# The first header byte's RSV1 bit: permessage-deflate's "this message is compressed".
cdef uint8_t RSV1 = 0x40
# The largest WebSocket frame header a server writes (no mask).
cdef Py_ssize_t MAX_HEADER = 10
cdef Py_ssize_t MAX_CHANNEL_LENGTH = 255

# Channel names: 1–255 characters from A–Z a–z 0–9 _ - . : @ /
cdef bint[128] CHANNEL_CHAR
for _c in range(128):
    CHANNEL_CHAR[_c] = (chr(_c).isascii() and chr(_c).isalnum()) or chr(_c) in "_-.:@/"

# A subscriber that asked for a channel's join and leave holds a second subscription, to
# WATCH_PREFIX + channel, a name no client can use: the events travel every bus as
# messages of that channel, with the fan-out, ordering and Redis subscriptions of any other.
WATCH_PREFIX = "#"
cdef Py_UCS4 WATCH_MARK = WATCH_PREFIX[0]

# Session.subscriptions' index for a subscription whose history read is on its way: the
# session is not in the channel's array yet (Hub.subscribe_history).
cdef Py_ssize_t WAITING = -1

cdef bytes MESSAGE_PREFIX = b'{"type":"message","channel":"'
# and the rest of a `message` (Hub.encode_message): data, from, timestamp
cdef bytes DATA_PART = b'","data":'
cdef bytes FROM_PART = b',"from":"'
cdef bytes TIMESTAMP_PART = b'","timestamp":'
# A message whose payload begins so names connections to leave out, wherever they are (a
# dialect's, fastfan.pusher's): each worker's Hub hands it to Hub.excepting, which fans out
# what it wraps. The Hub never encodes a client's message so (MESSAGE_PREFIX).
EXCEPTING_PREFIX = b'{"except":'
cdef bytes EXCEPTING = EXCEPTING_PREFIX


cdef bint is_excepting(object payload) except -1:
    """Whether `payload` begins with EXCEPTING_PREFIX."""
    cdef Py_buffer view
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        return view.len > len(EXCEPTING) and memcmp(
            view.buf, PyBytes_AS_STRING(EXCEPTING), len(EXCEPTING)) == 0
    finally:
        PyBuffer_Release(&view)


# Upper bounds (seconds) of fastfan_publish_latency_seconds's buckets; +Inf is implied.
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5, 5.0)
cdef enum:
    N_BOUNDS = 15  # len(LATENCY_BOUNDS); Histogram's arrays in _core.pxd have this size
    # How many message handling times the per-minute stats keep for their percentiles.
    MAX_SAMPLES = 65536


cdef inline char *_put(char *at, bytes part) noexcept:
    """Copy `part` to `at`; where the next part goes."""
    memcpy(at, PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part))
    return at + PyBytes_GET_SIZE(part)


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


cdef inline Py_ssize_t header_size(Py_ssize_t frame_size) noexcept nogil:
    """The header's length in a frame of `frame_size` bytes written by write_header."""
    if frame_size - 2 < 126:
        return 2
    if frame_size - 4 < 65536:
        return 4
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


def join_leave_event(bytes kind, str channel, bytes client_id, str user, str info):
    """`{"type":kind,"channel":C,"data":{"clientId","user"[,"info"]}}`: a join or leave,
    `info` the token's claim as JSON text ("" without one)."""
    return b'{"type":"%s","channel":"%s","data":{"clientId":"%s","user":%s%s}}' % (
        kind, channel.encode("ascii"), client_id, encode_json(user),
        b',"info":' + info.encode() if info else b"")


# How long a gathered presence answer serves again (Hub.gather_presence): what a client
# sees of other workers and nodes may be that old.
cdef double PRESENCE_FRESH = 0.5


cdef extern from "Python.h":
    # PYGEN_ERROR (-1, with the exception set), PYGEN_RETURN (0) or PYGEN_NEXT (1)
    int PyIter_Send(object iterator, object value, PyObject** result) except? -1


def first_step(coroutine, waiting):
    """Run an application hook's coroutine (fastfan.hooks) until it answers or waits: its
    answer, or `waiting(coroutine, what it waits for)`; what it raises, raised. The answer
    comes without the StopIteration a Python `send` raises: most hooks answer at once,
    and this is the per-publish cost of a can_publish."""
    cdef PyObject* result = NULL
    cdef int outcome
    if type(coroutine) is not CoroutineType and not hasattr(coroutine, "send"):
        raise TypeError(f"a hook must be async (async def): it returned "
                        f"{type(coroutine).__name__}, not a coroutine")
    outcome = PyIter_Send(coroutine, None, &result)
    answer = <object>result
    Py_DECREF(answer)  # PyIter_Send gave us a new reference; `answer` holds its own
    if outcome == 0:
        return answer
    return waiting(coroutine, answer)


# can_publish's `data` (Session._publish_hooked): the parsed JSON value
decode_json = msgspec.json.Decoder().decode


def user_key(str user):
    """A user's key in a presence part: the same for the same user on every worker, and 16
    characters however long the name, so a worker's part stays small."""
    return hashlib.blake2b(user.encode(), digest_size=8).hexdigest()


def utf8_is_valid(bytes text):
    """Whether `text` is valid UTF-8, by the validator every text frame goes through."""
    return utf8_validate(UTF8_ACCEPT, <const uint8_t*>PyBytes_AS_STRING(text),
                         PyBytes_GET_SIZE(text)) == UTF8_ACCEPT


# ByteBuffer -------------------------------------------------------------------------------

cdef int buffer_append(ByteBuffer* buffer, const char* ptr, Py_ssize_t n) except -1:
    cdef Py_ssize_t needed = buffer.size + n
    cdef Py_ssize_t capacity
    cdef char* grown
    if n <= 0:
        return 0
    if needed > buffer.capacity:
        capacity = max(needed, 2 * buffer.capacity, 256)
        grown = <char*>realloc(buffer.data, capacity)
        if grown == NULL:
            raise MemoryError()
        buffer.data = grown
        buffer.capacity = capacity
    memcpy(buffer.data + buffer.size, ptr, n)
    buffer.size = needed
    return 0


cdef inline void buffer_release(ByteBuffer* buffer) noexcept:
    """Empty the buffer and give its memory back."""
    buffer.size = 0
    buffer.capacity = 0
    free(buffer.data)
    buffer.data = NULL


cdef inline void buffer_clear(ByteBuffer* buffer) noexcept:
    """Empty the buffer, keeping its memory for the next loop turn (unless it is big)."""
    buffer.size = 0
    if buffer.capacity > KEEP_BUFFER_BYTES:
        buffer_release(buffer)


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


include "_deflate.pxi"
include "_outbox.pxi"
include "_session.pxi"
include "_hub.pxi"
