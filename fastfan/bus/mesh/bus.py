"""MeshBus: the embedded bus of several workers (see the package's docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import msgspec

from ..._core import Outbox
from ...directory import Counts, Node
from ...history import (
    HistoryAnswer,
    HistoryFullError,
    HistoryStore,
    ReadLimiter,
    owner_of,
    position,
)
from ..base import (
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
from ..commands import apply_command
from ..gather import Gatherings
from ..local import sequence_here, sweep_forever
from .peers import Incoming, Outgoing, address, peer_of, stranger
from .wire import (
    ENVELOPE_MARGIN,
    LIMIT,
    MAX_COMMAND,
    MAX_PRESENCE_ANSWER,
    MAX_READ_LIMIT,
    NO_ECHO,
    PRESENCE_ENTRY,
    QUERY,
    READ,
    SEQUENCED_ANSWER,
    TOKEN,
    Kind,
    decode_history,
    encode,
    record,
)

log = logging.getLogger("fastfan.bus")

# An owner that has not answered a history read in this long fails it (503, try again).
HISTORY_TIMEOUT = 2.0
# Publishes sent to their owner and not acknowledged yet; past this many (an owner that
# died with them), the oldest are forgotten: an "echo":false publisher may then receive
# its own message, never lose one.
MAX_UNACKNOWLEDGED = 10_000
# A worker that has not answered a presence or channels query in this long fails it (503).
PRESENCE_TIMEOUT = 2.0
RECONNECT_DELAY_MAX = 1.0


class MeshBus(Bus):
    def __init__(self, hub: HubLink, node: Node, worker: int, workers: int, *, sockets: str,
                 master_pid: int, max_message_size: int, history_ttl: float = 300.0) -> None:
        self.hub = hub
        self.node = node
        self.worker = worker
        self.workers = workers
        self.sockets = sockets
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
        self.interest: dict[int, set[str]] = {s: set() for s in range(workers) if s != worker}
        self.dropped_total = 0
        # Connected to every other worker once: until then a publish on a channel whose
        # history another worker keeps would be refused, so /ready waits for it. (A worker
        # that restarts later costs only its own channels' history publishes a moment.)
        self.joined_all = workers == 1
        self._next_query = 0  # of history reads
        self._gatherings = Gatherings(PRESENCE_TIMEOUT)  # presence and channels queries
        self._listener: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        path = address(self.sockets, self.worker)
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

    async def _stay_connected(self, worker: int) -> None:
        """Connect to a worker, tell it who we are and our channels; reconnect if it goes."""
        loop = asyncio.get_running_loop()
        delay = 0.01
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address(self.sockets, worker))
            except OSError:
                sock.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_DELAY_MAX)
                continue
            delay = 0.01
            _, peer = await loop.create_unix_connection(lambda: Outgoing(self, worker), sock=sock)
            peer.send(record(Kind.HELLO, str(self.worker).encode()))
            for channel in self.hub.channels:
                peer.subscribe(channel)
            self.outgoing[worker] = peer
            self.joined_all = self.joined_all or len(self.outgoing) == len(self.interest)
            await peer.lost
            del self.outgoing[worker]

    def publish(self, channel: str, payload: bytes, ack: Acknowledger | None,
                request_id: bytes, exclude: Outbox | None = None) -> int:
        self.hub.fanout(channel, payload, exclude)
        self._forward(channel, payload)
        if self.message_tap is not None:
            self.message_tap(channel, payload)
        return DONE

    def _forward(self, channel: str, payload: bytes, skip: int = -1) -> None:
        """Our publish on `channel`, to every other worker with subscribers for it."""
        data = None
        for worker, peer in self.outgoing.items():
            if worker != skip and channel in self.interest[worker]:
                if data is None:
                    data = record(Kind.PUBLISH, channel.encode(), payload)
                if not peer.send(data):
                    self.dropped_total += 1

    # History ----------------------------------------------------------------------------

    def publish_history(self, channel: str, payload: bytes, ack: Acknowledger | None,
                        request_id: bytes, exclude: Outbox | None = None) -> int:
        """To the channel's owner, to be numbered; acknowledged with its position."""
        owner = owner_of(channel, self.workers)
        if owner == self.worker:
            def fanout(numbered: bytes) -> None:
                self.hub.fanout(channel, numbered, exclude)
                self._forward(channel, numbered)
                if self.message_tap is not None:
                    self.message_tap(channel, numbered)

            return sequence_here(self.history, channel, payload, ack, request_id, fanout)
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
        if not peer.send(record(Kind.SEQUENCE, channel.encode(),
                                TOKEN.pack(token) + bytes((flags,)) + payload)):
            self._acknowledging.pop(token, None)
            self._unechoed.pop(token, None)
            return REFUSED
        return PENDING

    def sequence(self, channel: str, payload: bytes, origin: int, token: int,
                 no_echo: int) -> bytes:
        """As the channel's owner: number another worker's publish, keep it, fan it out
        and send it on. Returns the SEQUENCED answer for its worker (b"" if it needs none)."""
        if owner_of(channel, self.workers) != self.worker:
            log.warning("bus: worker %d sent a publish on %s to number, which worker %d owns",
                        origin, channel, owner_of(channel, self.workers))
            return b""
        try:
            offset, epoch, numbered = self.history.sequence(channel, payload)
        except HistoryFullError:
            return record(Kind.SEQUENCED, channel.encode(), SEQUENCED_ANSWER.pack(token, 0, 0)) \
                if token else b""
        self.hub.fanout(channel, numbered)
        returned = 0
        if no_echo and channel in self.interest[origin] and origin in self.outgoing:
            returned = int(self.outgoing[origin].send(record(
                Kind.PUBLISH_EXCLUDING, channel.encode(), TOKEN.pack(token) + numbered)))
            self._forward(channel, numbered, skip=origin)
        else:
            self._forward(channel, numbered)
        if self.message_tap is not None:
            self.message_tap(channel, numbered)
        if not token:
            return b""
        return record(Kind.SEQUENCED, channel.encode(),
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

    def owner_lost(self, worker: int) -> None:
        """Our connection to a worker went: the publishes it had not acknowledged may or may
        not have gone out; their publishers hear 503."""
        for token, (ack, request_id, owner) in list(self._acknowledging.items()):
            if owner == worker:
                del self._acknowledging[token]
                ack.acknowledge("", request_id, False)

    def returned(self, channel: str, token: int, payload: bytes) -> None:
        """Our "echo":false publish, numbered, back for our other subscribers."""
        self.hub.fanout(channel, payload, self._unechoed.pop(token, None))

    def read_history(self, channel: str, since: int, limit: int,
                     answer: Callable[[HistoryAnswer | None], None]) -> None:
        owner = owner_of(channel, self.workers)
        if owner == self.worker:
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
        if peer is None or not peer.send(record(Kind.HISTORY, channel.encode(), READ.pack(
                query, since, min(limit, MAX_READ_LIMIT)))):
            self._read_limiter.done()
            answer(None)
            return
        self._reads[query] = answer
        asyncio.get_running_loop().call_later(HISTORY_TIMEOUT, self._read_timed_out, query)

    def read_for(self, worker: int, channel: str, query: int, since: int, limit: int) -> None:
        """As the owner: answer a worker's read on our stream of publishes to it."""
        peer = self.outgoing.get(worker)
        if peer is None or owner_of(channel, self.workers) != self.worker:
            return  # it gives up after HISTORY_TIMEOUT
        top, epoch, messages = self.history.read(channel, since, max(0, limit))
        peer.send(record(Kind.HISTORY_ANSWER, channel.encode(), TOKEN.pack(query) + encode(
            [top, epoch, [[offset, msgspec.Raw(message)] for offset, message in messages]])))

    def history_answered(self, query: int, payload: bytes) -> None:
        answer = self._reads.pop(query, None)
        if answer is None:
            return
        self._read_limiter.done()
        try:
            top, epoch, messages = decode_history(payload)
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
        data = record(Kind.COMMAND, b"", payload)
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

    def joined(self, channel: str, client_id: bytes, user: str, info: str,
               metadata: str = "") -> None:
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

        self._gather(Kind.PRESENCE, channel.encode(), b"", [self.hub.presence_part(channel, limit)],
                     merged)

    def gather_channels(self, pattern: str | None, limit: int, local: Counts,
                        answer: Callable[[Counts | None], None]) -> None:
        """Ask every other worker for its channels matching `pattern` (its `limit` busiest);
        `answer(pairs)` with ours and all of theirs, or `answer(None)` as presence does."""
        self._gather(Kind.CHANNELS, b"", LIMIT.pack(limit) + (pattern or "*").encode(), local,
                     answer)

    def _gather(self, kind: Kind, channel: bytes, asked: bytes, local: list[Any],
                answer: Callable[[Any], None]) -> None:
        def ask_each(query: int) -> list[int]:
            data = record(kind, channel, QUERY.pack(query) + asked)
            return [worker for worker, peer in self.outgoing.items() if peer.send(data)]

        self._gatherings.ask(local, answer, ask_each)

    def presence_answered(self, worker: int, query: int, entries: list[Any]) -> None:
        """A worker's part of a presence or channels query."""
        self._gatherings.part(query, worker, entries)

    def presence_answered_by_all(self, worker: int) -> None:
        """A worker went away: its subscribers went with it, it owes no answer."""
        self._gatherings.gone(worker)

    async def nodes(self) -> list[dict[str, Any]]:
        return [self.node.describe()]

    def health(self) -> BusHealth:
        return BusHealth(up=self.joined_all, dropped=self.dropped_total,
                         down=() if self.joined_all else ("workers connecting",))

    def unsubscribe(self, channel: str) -> None:
        data = record(Kind.UNSUBSCRIBE, channel.encode())
        for peer in self.outgoing.values():
            peer.send(data)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(OSError):
                os.unlink(address(self.sockets, self.worker))
                os.rmdir(self.sockets)  # the last worker out, if the master cannot
