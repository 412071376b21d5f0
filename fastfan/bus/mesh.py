"""The embedded bus of several workers: every worker connected to every other one.

Each worker listens on a Unix socket `<directory>/<slot>`, and connects out to every other
slot. It sends on its outgoing connections (its publishes, and which channels it has
subscribers for) and receives on the incoming ones. A publish is fanned out locally at
once and sent, as the encoded `message`, only to the workers that said they have
subscribers for its channel: a worker subscribed to nothing receives nothing. One stream
per pair of workers keeps each publisher's order.

A server API command (COMMAND: `disconnect`, `unsubscribe`) goes to every connected
worker whatever its channels, and each applies it to its own clients. A presence query
(PRESENCE) and a channels query (CHANNELS, the API's `channels` and the status page) go to
every connected worker too, which answers on the same connection (PRESENCE_ANSWER,
CHANNELS_ANSWER); the asker waits for every one it asked, at most PRESENCE_TIMEOUT.

`subscribed` is a promise: a worker that gains its first subscriber of a channel sends
SUBSCRIBE to every other worker, and each answers SUBSCRIBED on the same connection once
it forwards that channel; the Hub holds the client's `subscribed` reply until every
connected worker has answered (a worker that goes away owes nothing).

History (fastfan.history): each channel with history has one owner, `owner_of(channel)`,
whose HistoryStore numbers and keeps its messages. A publish on it goes to the owner
(SEQUENCE; its acknowledgement comes back as SEQUENCED), which numbers it, fans it out
and sends it to the interested workers like its own publish (to the publisher's worker as
PUBLISH_EXCLUDING when the publisher asked for no echo). A history read (HISTORY) is
answered (HISTORY_ANSWER) on the owner's stream of publishes to the reader, the same
stream as the channel's messages: after every message up to the read's position, before
every later one, which is what a subscription's seam needs (Hub.subscribe_history). A
worker's death costs its channels their history: its successor starts new epochs.

Only the server's own workers may reach the bus: a record on it is delivered to clients
with no token or rate limit checked. So the master creates the directory with
`tempfile.mkdtemp` before forking (mode 0700, a random name: no other user can connect
into it, nobody can bind our names first), and every accepted connection must come, by
its SO_PEERCRED, from our uid and from a child of our master; anything else is closed
before a byte is read. (Abstract sockets, used before, have no permissions at all.
Socketpairs made before the fork would need the master to hand new ones to every worker
over a control channel each time one restarts; a path the restarted worker binds again
needs nothing.) Records from an accepted worker are still checked: one longer than the
largest message, an unknown kind, a channel that is not ASCII or a bad HELLO drops that
connection with one warning line, never an exception in the loop or memory the size of
what the header claims.

Cost per message: one record (6 bytes + channel + payload) appended to the outgoing buffer
of each interested worker, written once per loop turn, and a parse plus `Hub.fanout` on
the receiving side. A restarted worker binds the same path, the others reconnect to it
(and it to them) and tell it their channels again; what was published to it meanwhile is
lost for its clients, who were disconnected anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from .._core import WATCH_PREFIX, Outbox
from ..auth import MAX_TOKEN_LENGTH
from ..directory import MAX_LISTED, Counts, Node, channel_counts
from ..history import HistoryAnswer, HistoryFullError, HistoryStore, ReadLimiter, owner_of, position
from .base import (
    DONE,
    PENDING,
    REFUSED,
    Acknowledger,
    Bus,
    BusHealth,
    HubLink,
    Presence,
    merge_presence,
)
from .commands import apply_command
from .gather import Gatherings
from .local import sweep_forever

log = logging.getLogger("fastfan.bus")

HELLO, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, SUBSCRIBED, PRESENCE, PRESENCE_ANSWER = range(1, 8)
# A server API command (bus.encode_command's JSON, no channel), sent to every worker.
COMMAND = 8
# History: a publish for the channel's owner to number (token, flags, message), its
# acknowledgement (token, offset, epoch), a numbered message back to its publisher's worker
# (token, message), a read (query, since, limit) and its answer (query, JSON). A SEQUENCED
# of offset 0 is a refusal: the owner's store is full (HistoryFullError).
SEQUENCE, SEQUENCED, PUBLISH_EXCLUDING, HISTORY, HISTORY_ANSWER = range(9, 14)
TOKEN = struct.Struct("!I")
SEQUENCED_ANSWER = struct.Struct("!IqB")  # token, offset, sent back (then epoch)
READ = struct.Struct("!Iqi")  # query, since, limit
MAX_READ_LIMIT = (1 << 31) - 1  # READ's limit (a --history-size may be larger)
NO_ECHO = 1  # SEQUENCE's flag: the publisher is not to receive its message
# A SEQUENCED record: its header, a channel and an epoch.
MAX_SEQUENCED = 2 + 255 + SEQUENCED_ANSWER.size + 64
# An owner that has not answered a history read in this long fails it (503, try again).
HISTORY_TIMEOUT = 2.0
# What a record of each history kind carries at least, after its channel.
MIN_BODY = {SEQUENCE: TOKEN.size + 1, PUBLISH_EXCLUDING: TOKEN.size, HISTORY: READ.size,
            HISTORY_ANSWER: TOKEN.size}
# Publishes sent to their owner and not acknowledged yet; past this many (an owner that
# died with them), the oldest are forgotten: an "echo":false publisher may then receive
# its own message, never lose one.
MAX_UNACKNOWLEDGED = 10_000
# The server API's `channels` (and the status page's busiest channels): CHANNELS asks a
# worker for its channels (payload: a query number, a limit, the pattern), CHANNELS_ANSWER
# gives its [channel, subscribers] pairs (fastfan.directory.channel_counts).
CHANNELS, CHANNELS_ANSWER = 14, 15
LIMIT = struct.Struct("!I")
# A SUBSCRIBED record (the answer to a SUBSCRIBE, back on the same connection) is no
# longer than its header and a channel name.
MAX_ANSWER = 2 + 255
# A PRESENCE_ANSWER is a worker's Presence part of one channel: its count, a 16-character
# key per distinct user, and at most --presence-limit entries of at most PRESENCE_ENTRY
# bytes (the user and info come from one token): MeshBus.max_presence_answer, this bound
# plus the entries, admits any. A CHANNELS_ANSWER too: a worker lists at most
# directory.MAX_LISTED channels, about 54 MB at most.
MAX_PRESENCE_ANSWER = 64 << 20
PRESENCE_ENTRY = 2 * MAX_TOKEN_LENGTH
# A worker that has not answered a presence or channels query in this long fails it (503).
PRESENCE_TIMEOUT = 2.0
QUERY = struct.Struct("!I")
# length of what follows the length field, record kind, channel length
HEADER = struct.Struct("!IBB")
# struct ucred, what SO_PEERCRED answers: pid, uid, gid
CREDENTIALS = struct.Struct("3i")
# The largest PUBLISH a worker sends is a `message` whose `data` came in a client message
# of at most --max-message-size bytes, wrapped in its envelope (type, channel of up to
# 255 bytes, from, timestamp: under 400 bytes) behind the channel again. Anything longer
# than --max-message-size plus this generous margin comes from no fastfan worker.
ENVELOPE_MARGIN = 4096
# A worker that stops reading its bus connection (stuck or dying) must not grow our
# memory without bound: past this many unsent bytes, messages for it are dropped.
MAX_PEER_BACKLOG = 64 << 20
RECONNECT_DELAY_MAX = 1.0
# The largest COMMAND: its JSON around a user's name (the API refuses one longer than a
# token, auth.MAX_TOKEN_LENGTH) and a channel's: whatever --max-message-size is.
MAX_COMMAND = 16 * 1024


class JoinOrLeave(msgspec.Struct):
    class Data(msgspec.Struct):
        clientId: str  # noqa: N815 - the wire's name

    type: str
    data: Data


def _join_or_leave(event: bytes) -> tuple[str, str]:
    decoded = _decode_join_or_leave(event)
    return decoded.type, decoded.data.clientId


_decode_join_or_leave = msgspec.json.Decoder(JoinOrLeave).decode
_encode = msgspec.json.encode
_decode_presence = msgspec.json.Decoder(tuple[int, list[str], list[list[str]]]).decode
_decode_counts = msgspec.json.Decoder(list[tuple[str, int]]).decode
_decode_history = msgspec.json.Decoder(
    tuple[int, str, list[tuple[int, msgspec.Raw]]]).decode


def address(directory: str, slot: int) -> str:
    return os.path.join(directory, str(slot))


def record(kind: int, channel: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(2 + len(channel) + len(payload), kind, len(channel)) + channel + payload


def peer_of(sock: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process at the other end of a Unix socket, by the kernel."""
    pid, uid, _ = CREDENTIALS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, CREDENTIALS.size))
    return pid, uid


def stranger(pid: int, uid: int, master_pid: int) -> str | None:
    """Why a connecting process is not a sibling worker; None when it is one."""
    if uid != os.geteuid():
        return f"pid {pid} runs as uid {uid}, not ours"
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        parent = int(stat.rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return f"pid {pid} is gone"
    if parent != master_pid:
        return f"pid {pid} is not a worker of master {master_pid}"
    return None


class Incoming(asyncio.Protocol):
    """A connection from another worker: its HELLO, its channels, its publishes."""

    def __init__(self, bus: MeshBus, pid: int) -> None:
        self.bus = bus
        self.pid = pid
        self.slot: int | None = None
        self.transport: Any = None
        self.buffer = bytearray()
        # The joins this worker's watchers saw from that worker's clients, not yet left:
        # (channel, clientId) -> the leave to send them if that worker dies.
        self.joined: dict[tuple[str, str], bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset, end = 0, len(buffer)
        bus = self.bus
        fanout = bus.hub.fanout
        answers = []
        while end - offset >= 6:
            size, kind, channel_length = HEADER.unpack_from(buffer, offset)
            largest = bus.max_history_answer if kind == HISTORY_ANSWER else bus.max_record
            if not channel_length + 2 <= size <= largest:
                self._drop(f"a record of {size} bytes (channel {channel_length}, "
                           f"at most {largest})")
                return
            if end - offset - 4 < size:
                break
            start = offset + 6
            try:
                channel = buffer[start:start + channel_length].decode("ascii")
            except UnicodeDecodeError:
                self._drop("a channel that is not ASCII")
                return
            offset += 4 + size
            if offset - start - channel_length < MIN_BODY.get(kind, 0):
                self._drop(f"a record of kind {kind} too short for what it carries")
                return
            if kind == PUBLISH and self.slot is not None:
                payload = buffer[start + channel_length:offset]
                if channel.startswith(WATCH_PREFIX):
                    self._note_join_or_leave(channel, bytes(payload))
                fanout(channel, payload)
            elif kind == SUBSCRIBE and self.slot is not None:
                bus.interest[self.slot].add(channel)
                # From now on our publishes on `channel` go to that worker: tell it, so
                # that its subscriber's `subscribed` promises them.
                answers.append(record(SUBSCRIBED, channel.encode()))
            elif kind == PRESENCE and self.slot is not None:
                query = bytes(buffer[start + channel_length:offset])
                answers.append(record(PRESENCE_ANSWER, channel.encode(), query + _encode(
                    bus.hub.presence_part(channel, bus.hub.presence_limit))))
            elif kind == CHANNELS and self.slot is not None:
                asked = bytes(buffer[start + channel_length:offset])
                if len(asked) < QUERY.size + LIMIT.size:
                    self._drop("a channels query too short")
                    return
                (limit,) = LIMIT.unpack_from(asked, QUERY.size)
                pattern = asked[QUERY.size + LIMIT.size:].decode("utf-8", "replace")
                answers.append(record(CHANNELS_ANSWER, b"", asked[:QUERY.size] + _encode(
                    channel_counts(bus.hub.subscriber_counts(), pattern, min(limit, MAX_LISTED)))))
            elif kind == COMMAND and self.slot is not None:
                apply_command(bus.hub, bytes(buffer[start + channel_length:offset]))
            elif kind == SEQUENCE and self.slot is not None:
                token, flags = TOKEN.unpack_from(buffer, start + channel_length)[0], buffer[
                    start + channel_length + 4]
                answer = bus.sequence(channel, bytes(buffer[start + channel_length + 5:offset]),
                                      self.slot, token, flags & NO_ECHO)
                if answer:
                    answers.append(answer)
            elif kind == PUBLISH_EXCLUDING and self.slot is not None:
                (token,) = TOKEN.unpack_from(buffer, start + channel_length)
                bus.returned(channel, token, bytes(buffer[start + channel_length + 4:offset]))
            elif kind == HISTORY and self.slot is not None:
                query, since, limit = READ.unpack_from(buffer, start + channel_length)
                bus.read_for(self.slot, channel, query, since, limit)
            elif kind == HISTORY_ANSWER and self.slot is not None:
                (query,) = TOKEN.unpack_from(buffer, start + channel_length)
                bus.history_answered(query, bytes(buffer[start + channel_length + 4:offset]))
            elif kind == UNSUBSCRIBE and self.slot is not None:
                bus.interest[self.slot].discard(channel)
            elif kind == HELLO and self.slot is None:
                slot = int(channel) if channel.isdigit() else -1
                if slot not in bus.interest:
                    self._drop(f"HELLO from slot {channel!r}")
                    return
                self.slot = slot
                bus.incoming[slot] = self
                bus.interest[slot].clear()
            else:
                self._drop(f"record kind {kind}"
                           + (" before HELLO" if self.slot is None else ", unexpected"))
                return
        del buffer[:offset]
        if answers:
            self.transport.write(b"".join(answers))

    def _drop(self, what: str) -> None:
        log.warning("bus: dropped the connection of worker %s (pid %d): %s",
                    "?" if self.slot is None else self.slot, self.pid, what)
        self.buffer = bytearray()
        self.transport.abort()

    def _note_join_or_leave(self, channel: str, event: bytes) -> None:
        try:
            kind, client_id = _join_or_leave(event)
        except msgspec.DecodeError:
            return
        if kind == "join":
            self.joined[channel, client_id] = event.replace(b'"type":"join"', b'"type":"leave"',
                                                            1)
        else:
            self.joined.pop((channel, client_id), None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slot is not None and self.bus.incoming.get(self.slot) is self:
            del self.bus.incoming[self.slot]
            self.bus.interest[self.slot].clear()
        # That worker died (or stops): its clients left, though it cannot say so.
        joined, self.joined = self.joined, {}
        for (channel, _), leave in joined.items():
            self.bus.hub.fanout(channel, leave)


class Outgoing(asyncio.Protocol):
    """Our connection to another worker; records queue up and go out once per loop turn."""

    def __init__(self, bus: MeshBus, slot: int) -> None:
        self.bus = bus
        self.slot = slot
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport
        self.pending = bytearray()
        self.flush_scheduled = False
        self.lost = asyncio.get_running_loop().create_future()
        self.answers = bytearray()
        # channel -> SUBSCRIBEs sent that the worker has not answered yet
        self.unanswered: dict[str, int] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def subscribe(self, channel: str) -> bool:
        """Send a SUBSCRIBE and expect its answer; False when the worker is not reachable."""
        if not self.send(record(SUBSCRIBE, channel.encode())):
            return False
        self.unanswered[channel] = self.unanswered.get(channel, 0) + 1
        return True

    def data_received(self, data: bytes) -> None:
        """The worker's answers to our SUBSCRIBEs and presence queries."""
        answers = self.answers
        answers += data
        offset, end = 0, len(answers)
        while end - offset >= 6:
            size, kind, channel_length = HEADER.unpack_from(answers, offset)
            if not ((kind == SUBSCRIBED and size == channel_length + 2 <= MAX_ANSWER)
                    or (kind == SEQUENCED
                        and channel_length + 2 + SEQUENCED_ANSWER.size <= size <= MAX_SEQUENCED)
                    or (kind in (PRESENCE_ANSWER, CHANNELS_ANSWER)
                        and channel_length + 2 + QUERY.size <= size
                        <= self.bus.max_presence_answer)):
                log.warning("bus: dropped the connection to worker %d: record kind %d, %d "
                            "bytes, on its answering side", self.slot, kind, size)
                self.transport.abort()
                return
            if end - offset - 4 < size:
                break
            start = offset + 6 + channel_length
            channel = answers[offset + 6:start].decode("ascii", "replace")
            offset += 4 + size
            if kind == SEQUENCED:
                token, number, returned = SEQUENCED_ANSWER.unpack_from(answers, start)
                epoch = answers[start + SEQUENCED_ANSWER.size:offset].decode("ascii", "replace")
                self.bus.sequenced(channel, token, number, epoch, returned)
                continue
            if kind in (PRESENCE_ANSWER, CHANNELS_ANSWER):
                (query,) = QUERY.unpack_from(answers, start)
                body = answers[start + QUERY.size:offset]
                try:
                    if kind == PRESENCE_ANSWER:
                        what = "presence answer that is not [count, users, entries]"
                        entries: list[Any] = [_decode_presence(body)]
                    else:
                        what = "channels answer that is not a list of [channel, subscribers]"
                        entries = _decode_counts(body)
                except msgspec.DecodeError:
                    log.warning("bus: dropped the connection to worker %d: a %s", self.slot,
                                what)
                    self.transport.abort()
                    return
                self.bus.presence_answered(self.slot, query, entries)
                continue
            count = self.unanswered.get(channel, 0)
            if count > 1:
                self.unanswered[channel] = count - 1
            elif count == 1:
                del self.unanswered[channel]
                self.bus.answered(channel)
        del answers[:offset]

    def send(self, data: bytes) -> bool:
        transport = self.transport
        if transport is None or transport.get_write_buffer_size() > MAX_PEER_BACKLOG:
            return False
        self.pending += data
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        return True

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.transport is not None and self.pending:
            self.transport.write(bytes(self.pending))
        self.pending.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        unanswered, self.unanswered = self.unanswered, {}
        for channel in unanswered:  # a worker gone has no publishes to promise
            self.bus.answered(channel)
        self.bus.presence_answered_by_all(self.slot)  # nor subscribers
        self.bus.owner_lost(self.slot)  # nor acknowledgements
        if not self.lost.done():
            self.lost.set_result(None)


class MeshBus(Bus):
    def __init__(self, hub: HubLink, node: Node, slot: int, workers: int, *, directory: str,
                 master_pid: int, max_message_size: int, history_ttl: float = 300.0) -> None:
        self.hub = hub
        self.node = node
        self.slot = slot
        self.workers = workers
        self.directory = directory
        self.master_pid = master_pid
        self.max_record = 2 + max(max_message_size + ENVELOPE_MARGIN, MAX_COMMAND)
        self.max_history_answer = 2 + 255 + 4 + 64 + hub.history_size * (
            max_message_size + ENVELOPE_MARGIN + 32)
        self.max_presence_answer = MAX_PRESENCE_ANSWER + hub.presence_limit * PRESENCE_ENTRY
        # the channels this worker owns: their history
        self.history = HistoryStore(hub.history_size, history_ttl, hub.history_max_bytes)
        # publishes out to their owner: token -> (who waits, request id) to acknowledge, and
        # token -> publisher to skip when its message comes back ("echo":false)
        self._acknowledging: dict[int, tuple[Acknowledger, bytes, int]] = {}
        self._unechoed: dict[int, Outbox] = {}
        self._next_token = 0
        self._reads: dict[int, Callable[[HistoryAnswer | None], None]] = {}
        self._read_limiter = ReadLimiter()  # of the reads sent to other workers
        self.outgoing: dict[int, Outgoing] = {}
        self.incoming: dict[int, Incoming] = {}
        self.interest: dict[int, set[str]] = {s: set() for s in range(workers) if s != slot}
        self.dropped_total = 0
        self._next_query = 0  # of history reads
        self._gatherings = Gatherings(PRESENCE_TIMEOUT)  # presence and channels queries
        self._listener: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        path = address(self.directory, self.slot)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by the worker this one replaces
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(self.workers * 2)
        listener.setblocking(False)
        self._listener = listener
        self._tasks = [loop.create_task(self._accept_forever(listener))]
        self._tasks += [loop.create_task(self._stay_connected(s)) for s in self.interest]
        if self.hub.history_size:
            self._tasks.append(loop.create_task(sweep_forever(self.history)))

    async def _accept_forever(self, listener: socket.socket) -> None:
        """Let in our sibling workers, and nobody else."""
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            pid, uid = peer_of(sock)
            refusal = stranger(pid, uid, self.master_pid)
            if refusal is not None:
                log.warning("bus: refused a connection: %s", refusal)
                sock.close()
                continue
            await loop.create_unix_connection(functools.partial(Incoming, self, pid), sock=sock)

    async def _stay_connected(self, slot: int) -> None:
        """Connect to a worker, tell it who we are and our channels; reconnect if it goes."""
        loop = asyncio.get_running_loop()
        delay = 0.01
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address(self.directory, slot))
            except OSError:
                sock.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_DELAY_MAX)
                continue
            delay = 0.01
            _, peer = await loop.create_unix_connection(lambda: Outgoing(self, slot), sock=sock)
            peer.send(record(HELLO, str(self.slot).encode()))
            for channel in self.hub.channels:
                peer.subscribe(channel)
            self.outgoing[slot] = peer
            await peer.lost
            del self.outgoing[slot]

    def publish(self, channel: str, payload: bytes, ack: Acknowledger | None,
                request_id: bytes, exclude: Outbox | None = None) -> int:
        self.hub.fanout(channel, payload, exclude)
        self._forward(channel, payload)
        return DONE

    def _forward(self, channel: str, payload: bytes, skip: int = -1) -> None:
        """Our publish on `channel`, to every other worker with subscribers for it."""
        data = None
        for slot, peer in self.outgoing.items():
            if slot != skip and channel in self.interest[slot]:
                if data is None:
                    data = record(PUBLISH, channel.encode(), payload)
                if not peer.send(data):
                    self.dropped_total += 1

    # History ----------------------------------------------------------------------------

    def publish_history(self, channel: str, payload: bytes, ack: Acknowledger | None,
                        request_id: bytes, exclude: Outbox | None = None) -> int:
        """To the channel's owner, to be numbered; acknowledged with its position."""
        owner = owner_of(channel, self.workers)
        if owner == self.slot:
            try:
                offset, epoch, numbered = self.history.sequence(channel, payload)
            except HistoryFullError as full:
                if ack is not None:
                    ack.acknowledge(channel, request_id, False, refusal=str(full))
                return PENDING
            self.hub.fanout(channel, numbered, exclude)
            self._forward(channel, numbered)
            if ack is not None:
                ack.acknowledge(channel, request_id, True, position(offset, epoch))
            return PENDING
        peer = self.outgoing.get(owner)
        if peer is None:
            return REFUSED  # the owner is restarting: try again
        token = flags = 0
        if ack is not None or exclude is not None:
            self._next_token = token = self._next_token % 0xFFFFFFFF + 1
            if len(self._unechoed) >= MAX_UNACKNOWLEDGED:
                self._unechoed.clear()
            if ack is not None:
                self._acknowledging[token] = (ack, request_id, owner)
            if exclude is not None:
                self._unechoed[token] = exclude
                flags = NO_ECHO
        if not peer.send(record(SEQUENCE, channel.encode(),
                                TOKEN.pack(token) + bytes((flags,)) + payload)):
            self._acknowledging.pop(token, None)
            self._unechoed.pop(token, None)
            return REFUSED
        return PENDING

    def sequence(self, channel: str, payload: bytes, origin: int, token: int,
                 no_echo: int) -> bytes:
        """As the channel's owner: number another worker's publish, keep it, fan it out
        and send it on. Returns the SEQUENCED answer for its worker (b"" if it needs none)."""
        if owner_of(channel, self.workers) != self.slot:
            log.warning("bus: worker %d sent a publish on %s to number, which worker %d owns",
                        origin, channel, owner_of(channel, self.workers))
            return b""
        try:
            offset, epoch, numbered = self.history.sequence(channel, payload)
        except HistoryFullError:
            return record(SEQUENCED, channel.encode(), SEQUENCED_ANSWER.pack(token, 0, 0)) \
                if token else b""
        self.hub.fanout(channel, numbered)
        returned = 0
        if no_echo and channel in self.interest[origin] and origin in self.outgoing:
            returned = int(self.outgoing[origin].send(record(
                PUBLISH_EXCLUDING, channel.encode(), TOKEN.pack(token) + numbered)))
            self._forward(channel, numbered, skip=origin)
        else:
            self._forward(channel, numbered)
        if not token:
            return b""
        return record(SEQUENCED, channel.encode(),
                      SEQUENCED_ANSWER.pack(token, offset, returned) + epoch.encode("ascii"))

    def sequenced(self, channel: str, token: int, offset: int, epoch: str,
                  returned: int) -> None:
        """The owner numbered our publish: acknowledge it with its position (offset 0: the
        owner's store was full)."""
        acknowledging = self._acknowledging.pop(token, None)
        if not returned:
            self._unechoed.pop(token, None)  # no message comes back to skip anyone for
        if acknowledging is None:
            return
        ack, request_id, _ = acknowledging
        if offset:
            ack.acknowledge(channel, request_id, True, position(offset, epoch))
        else:
            ack.acknowledge(channel, request_id, False,
                            refusal=str(HistoryFullError(self.history.max_bytes)))

    def owner_lost(self, slot: int) -> None:
        """Our connection to a worker went: the publishes it had not acknowledged may or may
        not have gone out; their publishers hear 503."""
        for token, (ack, request_id, owner) in list(self._acknowledging.items()):
            if owner == slot:
                del self._acknowledging[token]
                ack.acknowledge("", request_id, False)

    def returned(self, channel: str, token: int, payload: bytes) -> None:
        """Our "echo":false publish, numbered, back for our other subscribers."""
        self.hub.fanout(channel, payload, self._unechoed.pop(token, None))

    def read_history(self, channel: str, since: int, limit: int,
                     answer: Callable[[HistoryAnswer | None], None]) -> None:
        owner = owner_of(channel, self.workers)
        if owner == self.slot:
            answer(self.history.read(channel, since, limit))
            return
        self._read_limiter.submit(
            functools.partial(self._send_read, owner, channel, since, limit, answer),
            functools.partial(answer, None))

    def _send_read(self, owner: int, channel: str, since: int, limit: int,
                   answer: Callable[[HistoryAnswer | None], None]) -> None:
        peer = self.outgoing.get(owner)
        self._next_query += 1
        query = self._next_query
        if peer is None or not peer.send(record(HISTORY, channel.encode(), READ.pack(
                query, since, min(limit, MAX_READ_LIMIT)))):
            self._read_limiter.done()
            answer(None)
            return
        self._reads[query] = answer
        asyncio.get_running_loop().call_later(HISTORY_TIMEOUT, self._read_timed_out, query)

    def read_for(self, slot: int, channel: str, query: int, since: int, limit: int) -> None:
        """As the owner: answer a worker's read on our stream of publishes to it."""
        peer = self.outgoing.get(slot)
        if peer is None or owner_of(channel, self.workers) != self.slot:
            return  # it gives up after HISTORY_TIMEOUT
        top, epoch, messages = self.history.read(channel, since, max(0, limit))
        peer.send(record(HISTORY_ANSWER, channel.encode(), TOKEN.pack(query) + _encode(
            [top, epoch, [[offset, msgspec.Raw(message)] for offset, message in messages]])))

    def history_answered(self, query: int, payload: bytes) -> None:
        answer = self._reads.pop(query, None)
        if answer is None:
            return
        self._read_limiter.done()
        try:
            top, epoch, messages = _decode_history(payload)
        except msgspec.DecodeError:
            log.warning("bus: a history answer that is not one")
            answer(None)
            return
        answer(HistoryAnswer(top, epoch, [(offset, bytes(raw)) for offset, raw in messages]))

    def _read_timed_out(self, query: int) -> None:
        answer = self._reads.pop(query, None)
        if answer is not None:
            self._read_limiter.done()
            answer(None)

    def command(self, payload: bytes, ack: Acknowledger | None) -> int:
        """A server API command, for this worker's clients and every other worker's (sent
        after, on the same stream as, our publishes: a publish made after it comes after
        it everywhere). REFUSED when a connected worker cannot take it (stuck): applied
        where it could be, and a command may be applied twice."""
        apply_command(self.hub, payload)
        data = record(COMMAND, b"", payload)
        sent = [peer.send(data) for peer in self.outgoing.values()]
        if not all(sent):
            self.dropped_total += sent.count(False)
            return REFUSED
        return DONE

    def subscribe(self, channel: str) -> bool:
        """Tell every worker; True: Hub.confirm(channel) follows once they have all answered."""
        waiting = False
        for peer in self.outgoing.values():
            waiting = peer.subscribe(channel) or waiting
        return waiting

    def answered(self, channel: str) -> None:
        """A worker answered (or left): confirm once no worker still owes an answer."""
        if not any(channel in peer.unanswered for peer in self.outgoing.values()):
            self.hub.confirm(channel)

    def joined(self, channel: str, client_id: bytes, user: str, info: str) -> None:
        """Presence is the subscriber arrays: gather_presence asks for them."""

    def left(self, channel: str, client_id: bytes) -> None:
        """See joined."""

    def gather_presence(self, channel: str, answer: Callable[[Presence | None], None]) -> None:
        """Ask every other worker for its part of `channel`'s presence (each lists at most
        --presence-limit); `answer` with ours and all of theirs, or None if one did not
        answer in time."""
        limit = self.hub.presence_limit

        def merged(parts: list[Presence] | None) -> None:
            answer(None if parts is None else merge_presence(parts, limit))

        self._gather(PRESENCE, channel.encode(), b"", [self.hub.presence_part(channel, limit)],
                     merged)

    def gather_channels(self, pattern: str | None, limit: int, local: Counts,
                        answer: Callable[[Counts | None], None]) -> None:
        """Ask every other worker for its channels matching `pattern` (its `limit` busiest);
        `answer(pairs)` with ours and all of theirs, or `answer(None)` as presence does."""
        self._gather(CHANNELS, b"", LIMIT.pack(limit) + (pattern or "*").encode(), local,
                     answer)

    def _gather(self, kind: int, channel: bytes, asked: bytes, local: list[Any],
                answer: Callable[[Any], None]) -> None:
        def ask_each(query: int) -> list[int]:
            data = record(kind, channel, QUERY.pack(query) + asked)
            return [slot for slot, peer in self.outgoing.items() if peer.send(data)]

        self._gatherings.ask(local, answer, ask_each)

    def presence_answered(self, slot: int, query: int, entries: list[Any]) -> None:
        """A worker's part of a presence or channels query."""
        self._gatherings.part(query, slot, entries)

    def presence_answered_by_all(self, slot: int) -> None:
        """A worker went away: its subscribers went with it, it owes no answer."""
        self._gatherings.gone(slot)

    async def nodes(self) -> list[dict[str, Any]]:
        return [self.node.describe()]

    def health(self) -> BusHealth:
        return BusHealth(up=True, dropped=self.dropped_total)

    def unsubscribe(self, channel: str) -> None:
        data = record(UNSUBSCRIBE, channel.encode())
        for peer in self.outgoing.values():
            peer.send(data)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(OSError):
                os.unlink(address(self.directory, self.slot))
                os.rmdir(self.directory)  # the last worker out, if the master cannot
