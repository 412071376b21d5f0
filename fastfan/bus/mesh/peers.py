"""The embedded bus's connections between workers: who may connect, and the records each
side reads (Incoming: another worker's publishes and queries; Outgoing: our records to it,
and its answers).

Only the server's own workers may reach the bus (see the package's docstring): every
accepted connection must come, by its SO_PEERCRED, from our uid and from a child of our
master. Records from an accepted worker are still checked: one longer than the largest
message, an unknown kind, a channel that is not ASCII or a bad HELLO drops that
connection with one warning line, never an exception in the loop or memory the size of
what the header claims.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ..._core import WATCH_PREFIX, join_leave_event
from ...directory import MAX_LISTED, channel_counts
from ..commands import apply_command
from .wire import (
    ALREADY,
    FIRST_PART,
    HEADER,
    HOLDS,
    LIMIT,
    MAX_ANSWER,
    MAX_SEQUENCED,
    MEMBER,
    MIN_BODY,
    NO_ECHO,
    QUERY,
    READ,
    SEQUENCED_ANSWER,
    STARTED,
    TOKEN,
    Kind,
    decode_counts,
    decode_presence,
    decode_present,
    encode,
    join_or_leave,
    record,
)

if TYPE_CHECKING:
    from .bus import MeshBus

log = logging.getLogger("fastfan.bus")

# struct ucred, what SO_PEERCRED answers: pid, uid, gid
CREDENTIALS = struct.Struct("3i")
# A worker that stops reading its bus connection (stuck or dying) must not grow our
# memory without bound: past this many unsent bytes, messages for it are dropped.
MAX_PEER_BACKLOG = 64 << 20


def address(sockets: str, worker: int) -> str:
    """Where worker `worker` listens, in the master's folder of the bus's sockets."""
    return os.path.join(sockets, str(worker))


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


# A record handler: (channel, body) -> an answer to send back, or None; False when the
# connection was dropped for what the record held.
Handler = Callable[[str, bytes], bytes | bool | None]


class Incoming(asyncio.Protocol):
    """A connection from another worker: its HELLO, its channels, its publishes, queries."""

    def __init__(self, bus: MeshBus, pid: int) -> None:
        self.bus = bus
        self.pid = pid
        self.worker: int | None = None  # its index, once its HELLO came
        self.started_at = 0.0  # when it started (time.time()), as its HELLO says
        self.transport: Any = None
        self.buffer = bytearray()
        # That worker's clients on the channels our watchers watch, as it told us (its
        # PRESENT when we began to watch, then its joins and leaves): join/leave channel ->
        # clientId -> the leave to send our watchers if that worker dies.
        self.joined: dict[str, dict[str, bytes]] = {}
        # Every kind but PUBLISH (the per-message path, taken first) and HELLO (the first).
        self.handlers: dict[int, Handler] = {
            Kind.SUBSCRIBE: self._on_subscribe, Kind.UNSUBSCRIBE: self._on_unsubscribe,
            Kind.PRESENCE: self._on_presence, Kind.CHANNELS: self._on_channels,
            Kind.COMMAND: self._on_command, Kind.SEQUENCE: self._on_sequence,
            Kind.PUBLISH_EXCLUDING: self._on_publish_excluding,
            Kind.HISTORY: self._on_history, Kind.HISTORY_ANSWER: self._on_history_answer,
            Kind.PRESENT: self._on_present,
            Kind.OCCUPANCY: self._on_occupancy}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset, end = 0, len(buffer)
        bus = self.bus
        fanout = bus.hub.fanout
        answers: list[bytes] = []
        while end - offset >= 6:
            size, kind, channel_length = HEADER.unpack_from(buffer, offset)
            largest = bus.history.max_answer if kind == Kind.HISTORY_ANSWER else bus.max_record
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
            body = start + channel_length
            if offset - body < MIN_BODY.get(kind, 0):
                self._drop(f"a record of kind {kind} too short for what it carries")
                return
            if kind == Kind.PUBLISH and self.worker is not None:  # per message: first
                payload = buffer[body:offset]
                if channel.startswith(WATCH_PREFIX):
                    self._note_join_or_leave(channel, bytes(payload))
                fanout(channel, payload)
                continue
            handler: Handler | None
            if self.worker is None:
                handler = self._on_hello if kind == Kind.HELLO else None
            else:
                handler = self.handlers.get(kind)
            if handler is None:
                self._drop(f"record kind {kind}"
                           + (" before HELLO" if self.worker is None else ", unexpected"))
                return
            answer = handler(channel, bytes(buffer[body:offset]))
            if answer is False:
                return  # dropped
            if isinstance(answer, bytes):
                answers.append(answer)
        del buffer[:offset]
        if answers:
            self.transport.write(b"".join(answers))
        if bus.hub.overloaded:  # behind: read this worker's records once it has caught up
            bus.hub.hold_input(self.transport)

    def _on_hello(self, channel: str, body: bytes) -> bool | None:
        worker = int(channel) if channel.isdigit() else -1
        if worker not in self.bus.interest:
            self._drop(f"HELLO from worker {channel!r}")
            return False
        previous = self.bus.incoming.get(worker)
        self.worker = worker
        if len(body) == STARTED.size:
            (self.started_at,) = STARTED.unpack(body)
        self.bus.incoming[worker] = self
        self.bus.check_joined()
        if previous is not None and previous.pid != self.pid \
                and not previous.transport.is_closing():
            # A rolling restart's replacement, the worker it replaces still serving: its
            # channels still count until it goes.
            self.bus.replaced(worker)
        else:
            self.bus.interest[worker].clear()
            self.bus.withdraw(worker)  # what its predecessor held, if its end was not seen yet
        return None

    def _on_subscribe(self, channel: str, body: bytes) -> bytes:
        assert self.worker is not None
        self.bus.interest[self.worker].add(channel)
        if channel.startswith(WATCH_PREFIX):
            self.bus.send_present(self.worker, channel)
        # From now on our publishes on `channel` go to that worker: tell it, so that its
        # subscriber's `subscribed` promises them.
        return record(Kind.SUBSCRIBED, channel.encode())

    def _on_unsubscribe(self, channel: str, body: bytes) -> None:
        assert self.worker is not None
        self.bus.interest[self.worker].discard(channel)

    def _on_presence(self, channel: str, body: bytes) -> bytes:
        hub = self.bus.hub
        return record(Kind.PRESENCE_ANSWER, channel.encode(),
                      body + encode(hub.presence_part(channel, hub.presence_limit)))

    def _on_channels(self, channel: str, body: bytes) -> bytes | bool:
        if len(body) < QUERY.size + LIMIT.size:
            self._drop("a channels query too short")
            return False
        (limit,) = LIMIT.unpack_from(body, QUERY.size)
        pattern = body[QUERY.size + LIMIT.size:].decode("utf-8", "replace")
        counts = channel_counts(self.bus.hub.subscriber_counts(), pattern,
                                min(limit, MAX_LISTED))
        return record(Kind.CHANNELS_ANSWER, b"", body[:QUERY.size] + encode(counts))

    def _on_command(self, channel: str, body: bytes) -> None:
        apply_command(self.bus.hub, body)

    def _on_sequence(self, channel: str, body: bytes) -> bytes | None:
        assert self.worker is not None
        (token,), flags = TOKEN.unpack_from(body), body[TOKEN.size]
        return self.bus.history.sequence(channel, body[TOKEN.size + 1:], self.worker, token,
                                 flags & NO_ECHO) or None

    def _on_publish_excluding(self, channel: str, body: bytes) -> None:
        (token,) = TOKEN.unpack_from(body)
        self.bus.history.returned(channel, token, body[TOKEN.size:])

    def _on_history(self, channel: str, body: bytes) -> None:
        assert self.worker is not None
        query, since, limit = READ.unpack_from(body)
        self.bus.history.read_for(self.worker, channel, query, since, limit)

    def _on_history_answer(self, channel: str, body: bytes) -> None:
        (query,) = TOKEN.unpack_from(body)
        self.bus.history.answered(query, body[TOKEN.size:])

    def _on_present(self, channel: str, body: bytes) -> bool | None:
        try:
            entries = decode_present(body[1:])
        except msgspec.DecodeError:
            self._drop("a PRESENT that is not a list of [clientId, user, info]")
            return False
        if body[0] & FIRST_PART:
            self.joined.pop(channel, None)  # the joins and leaves before it are in it
        if entries:
            name = channel[len(WATCH_PREFIX):]
            known = self.joined.setdefault(channel, {})
            for client_id, user, info in entries:
                known[client_id] = join_leave_event(b"leave", name, client_id.encode(), user,
                                                    info)
        return None

    def _on_occupancy(self, channel: str, body: bytes) -> None:
        assert self.worker is not None
        flags = body[0]
        user = body[1:].decode("utf-8", "replace") if flags & MEMBER else None
        # What a worker held when it reached us is news if it started after us (we knew
        # it held nothing), not if we are the newcomer (the transition was told before us).
        self.bus.edge_of(self.worker, channel, user, bool(flags & HOLDS),
                         news=not flags & ALREADY or self.started_at > self.bus.started_at)

    def _drop(self, what: str) -> None:
        log.warning("bus: dropped the connection of worker %s (pid %d): %s",
                    "?" if self.worker is None else self.worker, self.pid, what)
        self.buffer = bytearray()
        self.transport.abort()

    def _note_join_or_leave(self, channel: str, event: bytes) -> None:
        try:
            kind, client_id = join_or_leave(event)
        except msgspec.DecodeError:
            return
        if kind == "join":
            self.joined.setdefault(channel, {})[client_id] = event.replace(
                b'"type":"join"', b'"type":"leave"', 1)
        elif (known := self.joined.get(channel)) is not None:
            known.pop(client_id, None)
            if not known:
                del self.joined[channel]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker is not None and self.bus.incoming.get(self.worker) is self:
            del self.bus.incoming[self.worker]
            self.bus.interest[self.worker].clear()
            self.bus.withdraw(self.worker, gone=True)  # what it held, nobody holds now
        # That worker died (or stops): its clients left, though it cannot say so.
        joined, self.joined = self.joined, {}
        for channel, leaves in joined.items():
            for leave in leaves.values():
                self.bus.hub.fanout(channel, leave)


class Outgoing(asyncio.Protocol):
    """Our connection to another worker; records queue up and go out once per loop turn."""

    def __init__(self, bus: MeshBus, worker: int) -> None:
        self.bus = bus
        self.worker = worker
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport
        self.pending = bytearray()
        self.flush_scheduled = False
        self.lost = asyncio.get_running_loop().create_future()
        self.answers = bytearray()
        # channel -> Kind.SUBSCRIBEs sent that the worker has not answered yet
        self.unanswered: dict[str, int] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def subscribe(self, channel: str) -> bool:
        """Send a Kind.SUBSCRIBE and expect its answer; False when the worker is not reachable."""
        if not self.send(record(Kind.SUBSCRIBE, channel.encode())):
            return False
        self.unanswered[channel] = self.unanswered.get(channel, 0) + 1
        return True

    def data_received(self, data: bytes) -> None:
        """The worker's answers to our Kind.SUBSCRIBEs and presence queries."""
        answers = self.answers
        answers += data
        offset, end = 0, len(answers)
        while end - offset >= 6:
            size, kind, channel_length = HEADER.unpack_from(answers, offset)
            if not ((kind == Kind.SUBSCRIBED and size == channel_length + 2 <= MAX_ANSWER)
                    or (kind == Kind.SEQUENCED
                        and channel_length + 2 + SEQUENCED_ANSWER.size <= size <= MAX_SEQUENCED)
                    or (kind in (Kind.PRESENCE_ANSWER, Kind.CHANNELS_ANSWER)
                        and channel_length + 2 + QUERY.size <= size
                        <= self.bus.max_presence_answer)):
                log.warning("bus: dropped the connection to worker %d: record kind %d, %d "
                            "bytes, on its answering side", self.worker, kind, size)
                self.transport.abort()
                return
            if end - offset - 4 < size:
                break
            start = offset + 6 + channel_length
            channel = answers[offset + 6:start].decode("ascii", "replace")
            offset += 4 + size
            if kind == Kind.SEQUENCED:
                token, number, returned = SEQUENCED_ANSWER.unpack_from(answers, start)
                epoch = answers[start + SEQUENCED_ANSWER.size:offset].decode("ascii", "replace")
                self.bus.history.sequenced(channel, token, number, epoch, returned)
                continue
            if kind in (Kind.PRESENCE_ANSWER, Kind.CHANNELS_ANSWER):
                (query,) = QUERY.unpack_from(answers, start)
                body = answers[start + QUERY.size:offset]
                try:
                    if kind == Kind.PRESENCE_ANSWER:
                        what = "presence answer that is not [count, users, entries]"
                        entries: list[Any] = [decode_presence(body)]
                    else:
                        what = "channels answer that is not a list of [channel, subscribers]"
                        entries = decode_counts(body)
                except msgspec.DecodeError:
                    log.warning("bus: dropped the connection to worker %d: a %s", self.worker,
                                what)
                    self.transport.abort()
                    return
                self.bus.presence_answered(self.worker, query, entries)
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
        if self.bus.outgoing.get(self.worker) is self:  # not a replaced one's (retiring)
            self.bus.presence_answered_by_all(self.worker)  # nor subscribers
            self.bus.history.owner_lost(self.worker)  # nor acknowledgements
        if not self.lost.done():
            self.lost.set_result(None)
