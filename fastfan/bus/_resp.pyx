"""The Redis bus's per-message work, compiled (issue #31): a publish queued and encoded as
a RESP command, Redis's answer to it, and a message Redis pushes handed to the Hub.

In Python (bus/redis.py before this) each of the three was a few Python calls, tuples and
attribute lookups: at 100k messages/s through one Redis, the frames of these functions held
about half of a worker's samples (py-spy, the Hub's fan-out they call included).
Compiled, a message costs 5-9% less CPU (4.85 against 5.35 µs at 200k/s: docs/
benchmarks.md, "Round three, session 3"); the rest is the WebSocket publish and the
fan-out's write. The connections (asyncio protocols), their state and every rare case stay in
Python (bus/redis.py, bus/resp.py): what comes here is only what runs per message, and
anything unusual (an error reply, a publish someone waits for, a message on the server's
own channels) is handed back to Python as before.
"""

from asyncio import Future

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdio cimport snprintf
from libc.string cimport memcpy

from fastfan._core cimport BusResult, Hub, Outbox

cdef enum:
    # What one queued publish holds beyond its channel and payload: the entry, the list
    # slot, the objects' headers. So that many small publishes count too.
    QUEUED_ENTRY_COST = 200
    # Publishes with "echo":false (and join/leave events) on their way through Redis, on
    # channels this worker subscribes to (only those come back): payload -> the publisher
    # to skip when it comes back. One that never comes back (its channel unsubscribed
    # meanwhile) would stay: past this many the oldest are forgotten (and all when Redis
    # goes down), and such a publisher may receive its own message, never lose one.
    MAX_UNECHOED = 10000


cdef inline Py_ssize_t queued_cost(bytes channel, bytes payload, bytes request_id):
    """What a queued publish holds: its channel, payload and request id (a client's `id`
    may be as large as its message), and the entry around it."""
    return (PyBytes_GET_SIZE(channel) + PyBytes_GET_SIZE(payload)
            + PyBytes_GET_SIZE(request_id) + QUEUED_ENTRY_COST)


def publish_cost(bytes channel, bytes payload, bytes request_id):
    """queued_cost, for Python (an entry Publishes.publish made a tuple of)."""
    return queued_cost(channel, payload, request_id)


cdef int append_bulk(bytearray out, const char *part, Py_ssize_t size) except -1:
    """`$<size>\\r\\n<part>\\r\\n` at the end of `out`."""
    cdef char head[32]
    cdef int head_size = snprintf(head, sizeof(head), b"$%zd\r\n", size)
    cdef Py_ssize_t at = PyByteArray_GET_SIZE(out)
    PyByteArray_Resize(out, at + head_size + size + 2)
    cdef char *end = PyByteArray_AS_STRING(out) + at
    memcpy(end, head, head_size)
    memcpy(end + head_size, part, size)
    memcpy(end + head_size + size, b"\r\n", 2)
    return 0


cdef class Publishes:
    """This loop turn's publishes, each encoded into one buffer as it comes (PUBLISH, or
    history's numbering script), and the bytes of publishes Redis has not answered yet.

    An entry per command waits for its answer, in order: a publish nobody waits for and
    without history is just its cost (an int), answered here; any other is the tuple
    (redis channel, payload, acknowledger or None, request id, history) that
    RedisBus._published answers, as it does every error reply."""

    cdef readonly bytes prefix, verb
    cdef public bint up          # RedisBus.up: publishes are taken
    cdef public bint full        # max_bytes reached; until half of it is answered
    cdef public bint scheduled   # a send is due at the end of this loop turn
    cdef readonly Py_ssize_t queued_bytes
    cdef readonly Py_ssize_t max_bytes
    cdef Hub hub
    cdef dict unechoed           # RedisBus._unechoed: payload -> publisher to leave out
    cdef object history          # RedisHistory: numbering_command
    cdef object schedule         # () -> None: a send at the end of this loop turn
    cdef object overflowed       # () -> None: `full` was just set
    cdef object room             # () -> None: `full` was just cleared
    cdef bytearray out
    cdef list entries

    def __init__(self, Hub hub, bytes prefix, bytes verb, Py_ssize_t max_bytes,
                 dict unechoed, history, schedule, overflowed, room):
        self.hub, self.prefix, self.verb, self.max_bytes = hub, prefix, verb, max_bytes
        self.unechoed, self.history = unechoed, history
        self.schedule, self.overflowed, self.room = schedule, overflowed, room
        self.out, self.entries = bytearray(), []

    cpdef int publish(self, str channel, bytes payload, object ack, bytes request_id,
                      Outbox exclude, bint history) except -1:
        """Queued: PENDING (Redis's answer acknowledges it), or REFUSED."""
        if not self.up:
            return BusResult.REFUSED
        cdef bytes redis_channel = self.prefix + channel.encode("ascii")
        cdef Py_ssize_t cost = queued_cost(redis_channel, payload, request_id)
        if self.queued_bytes + cost > self.max_bytes:
            self.full = True
            self.overflowed()
            return BusResult.REFUSED
        self.queued_bytes += cost
        if exclude is not None and channel in self.hub.channels:
            if len(self.unechoed) >= MAX_UNECHOED:
                del self.unechoed[next(iter(self.unechoed))]  # the oldest
            # (numbered, it comes back with its position before the closing brace)
            self.unechoed[payload[:-1] if history else payload] = exclude
        if history:
            self.out += self.history.numbering_command(redis_channel, payload)
        else:
            self.out += b"*3\r\n"
            append_bulk(self.out, PyBytes_AS_STRING(self.verb), PyBytes_GET_SIZE(self.verb))
            append_bulk(self.out, PyBytes_AS_STRING(redis_channel),
                        PyBytes_GET_SIZE(redis_channel))
            append_bulk(self.out, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
        self.entries.append(cost if ack is None and not history
                            else (redis_channel, payload, ack, request_id, history))
        if not self.scheduled:
            self.scheduled = True
            self.schedule()
        return BusResult.PENDING

    def take(self):
        """(the commands queued since the last take, their entries), and empty."""
        commands, entries = bytes(self.out), self.entries
        self.out, self.entries = bytearray(), []
        return commands, entries

    def waiting(self):
        """Whether publishes are queued and not taken yet."""
        return bool(self.entries)

    cpdef int answered(self, Py_ssize_t cost) except -1:
        """A publish's bytes are no longer held (answered, or failed)."""
        self.queued_bytes -= cost
        if self.full and self.queued_bytes <= self.max_bytes // 2:
            self.full = False
            self.room()
        return 0


def answer_replies(reader, waiting, answer, Publishes publishes):
    """Every whole reply `reader` (an hiredis.Reader) has, each to the oldest of `waiting`
    (a deque): a future gets it as its result, a publish's cost is answered here when the
    reply is not an error, anything else goes to `answer(entry, reply)`. False: a reply
    came to nothing (not a Redis we can talk to)."""
    cdef object entry, reply
    gets, popleft = reader.gets, waiting.popleft
    while True:
        reply = gets()
        if reply is False:
            return True
        if not waiting:
            return False
        entry = popleft()
        if type(entry) is int and publishes is not None and not isinstance(reply, Exception):
            publishes.answered(entry)
        elif isinstance(entry, Future):
            if not entry.done():
                entry.set_result(reply)
        else:
            answer(entry, reply)


cdef class Pushes:
    """The messages Redis pushes on the subscribing connection: each a JSON object in
    UTF-8 (else dropped and counted: subscribers would receive it as a text frame, and a
    browser fails a connection whose text is not UTF-8), fanned out to the Hub's
    subscribers of its channel, or, on the server's own channels, handed to `special`."""

    cdef Hub hub
    cdef bytes prefix
    cdef bytes commands          # the server API's commands channel
    cdef bytes reply_suffix      # how history's reply channels end
    cdef object special          # (redis channel, payload) -> None
    cdef object unechoed_publisher  # payload -> the publisher to leave out, or None
    cdef dict unechoed
    cdef object is_json_object   # msgspec's decoder: raises on anything but an object
    cdef public object directory_channels  # the directory's channels (a set), or None
    # (redis channel, payload) -> None: every well-formed message goes there instead of
    # `deliver` (a cluster master's @app.on_message taps), when not None
    cdef public object divert
    cdef public Py_ssize_t invalid_total

    def __init__(self, Hub hub, bytes prefix, bytes commands, bytes reply_suffix, special,
                 dict unechoed, unechoed_publisher, is_json_object):
        self.hub, self.prefix, self.commands, self.reply_suffix = (hub, prefix, commands,
                                                                     reply_suffix)
        self.special, self.unechoed, self.unechoed_publisher = (special, unechoed,
                                                                unechoed_publisher)
        self.is_json_object = is_json_object

    cpdef bint well_formed(self, bytes payload) except -1:
        """A JSON object in UTF-8 (else counted)."""
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(payload)
        cdef Py_ssize_t i, n = PyBytes_GET_SIZE(payload)
        try:
            self.is_json_object(payload)
            for i in range(n):
                if p[i] >= 0x80:  # msgspec.Raw lets strings through unchecked
                    payload.decode("utf-8")
                    break
        except (ValueError, RecursionError):  # (msgspec.DecodeError and UnicodeDecodeError)
            self.invalid_total += 1
            return False
        return True

    cpdef int message(self, bytes channel, bytes payload) except -1:
        """A message Redis pushed: checked, then delivered (or diverted)."""
        if not self.well_formed(payload):
            return 0
        if self.divert is not None:
            self.divert(channel, payload)
            return 0
        return self.deliver(channel, payload)

    cpdef int deliver(self, bytes channel, bytes payload) except -1:
        """A well-formed message to this worker's subscribers of its channel, or to
        `special` on the server's own channels."""
        if (channel == self.commands or channel.endswith(self.reply_suffix)
                or (self.directory_channels is not None
                    and channel in self.directory_channels)):
            self.special(channel, payload)
            return 0
        cdef Py_ssize_t skip = PyBytes_GET_SIZE(self.prefix)
        name = PyUnicode_DecodeASCII(PyBytes_AS_STRING(channel) + skip,
                                     PyBytes_GET_SIZE(channel) - skip, NULL)
        # (Redis cannot be held back while the server is behind: shed, Hub.fanout_or_shed)
        self.hub.fanout_or_shed(name, payload,
                                self.unechoed_publisher(payload) if self.unechoed else None)
        return 0

    def take(self, reader, other):
        """Every whole reply `reader` (an hiredis.Reader) has: a message (`message`, or
        sharded pub/sub's `smessage`) here, anything else to `other(reply)`."""
        cdef object reply, kind
        gets = reader.gets
        while True:
            reply = gets()
            if reply is False:
                return
            if type(reply) is list and len(<list>reply) == 3:
                kind = (<list>reply)[0]
                if kind == b"message" or kind == b"smessage":
                    self.message((<list>reply)[1], (<list>reply)[2])
                    continue
            other(reply)
