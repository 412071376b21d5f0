"""MeshBus: the embedded bus of several workers (see the package's docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from ..._core import WATCH_PREFIX, Outbox
from ...directory import Counts, Node
from ...history import HistoryAnswer, HistoryStore
from ...history import mesh as mesh_history
from ...history.local import sweep_forever
from ...presence import merge_presence
from ...webhooks.occupancy import Holders, LocalOccupancy, tell
from ..base import (
    DONE,
    REFUSED,
    Acknowledger,
    Bus,
    BusHealth,
    HubLink,
    Presence,
    Transitions,
)
from ..commands import apply_command
from ..gather import Gatherings
from .peers import Incoming, Outgoing, address, peer_of, stranger
from .wire import (
    ALREADY,
    ENVELOPE_MARGIN,
    FIRST_PART,
    HOLDS,
    LIMIT,
    MAX_COMMAND,
    MAX_PRESENCE_ANSWER,
    MEMBER,
    PRESENCE_ENTRY,
    PRESENT_PART_BYTES,
    QUERY,
    STARTED,
    Kind,
    encode,
    record,
)

log = logging.getLogger("fastfan.bus")

# A worker that has not answered a presence or channels query in this long fails it (503).
PRESENCE_TIMEOUT = 2.0
RECONNECT_DELAY_MAX = 1.0
# A worker tells the deployment's transitions only once it has run this long, by when the
# others have reconnected to it and told it what they hold (see MeshBus.leads).
SETTLE = 2 * RECONNECT_DELAY_MAX + 0.5


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
        self.max_presence_answer = MAX_PRESENCE_ANSWER + hub.presence_limit * PRESENCE_ENTRY
        # the channels this worker owns: their history; and the publishes and reads sent
        # to the other owners
        self.history = mesh_history.MeshHistory(
            self, HistoryStore(hub.history_size, history_ttl, hub.history_max_bytes,
                               hub.namespace_table),
            max_message_size, ENVELOPE_MARGIN)
        self.outgoing: dict[int, Outgoing] = {}
        # Links to workers a rolling restart replaced, while they still serve: they go on
        # getting our publishes on their channels until they go (see replaced).
        self.retiring: list[Outgoing] = []
        self._replaced: dict[int, asyncio.Future[None]] = {}
        self.incoming: dict[int, Incoming] = {}
        self.interest: dict[int, set[str]] = {s: set() for s in range(workers) if s != worker}
        self.dropped_total = 0
        # Linked both ways with every other worker once (our connection to it, and its
        # HELLO on its connection to us): until then a publish on a channel whose history
        # another worker keeps would be refused, and a message another worker publishes
        # (an on_message hook's, say) could not reach our subscribers, so /ready waits for
        # it. (A worker that restarts later costs only its own channels a moment.)
        self.joined_all = workers == 1
        self._gatherings = Gatherings(PRESENCE_TIMEOUT)  # presence and channels queries
        self._listener: socket.socket | None = None
        self._bound = 0  # the inode of the socket file we bound
        self._tasks: list[asyncio.Task[None]] = []
        # With webhooks: this worker's holdings, every worker's, and who hears the
        # transitions (on the lowest-numbered worker alive: leads())
        self.occupancy: LocalOccupancy | None = None
        self.holders = Holders()
        self.transitions: Transitions | None = None
        self.started_at = time.time()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        path = address(self.sockets, self.worker)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by the worker this one replaces
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        # A rolling restart's replacement binds the path again while this worker still
        # runs: stop() unlinks it only while it is still ours.
        self._bound = os.stat(path).st_ino
        listener.listen(self.workers * 2)
        listener.setblocking(False)
        self._listener = listener
        self._tasks = [loop.create_task(self._accept_forever(listener))]
        self._tasks += [loop.create_task(self._stay_connected(s)) for s in self.interest]
        if self.hub.history_size:
            self._tasks.append(loop.create_task(sweep_forever(self.history.store)))

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
            peer.send(record(Kind.HELLO, str(self.worker).encode(),
                             STARTED.pack(self.started_at)))
            for channel in self.hub.channels:
                peer.subscribe(channel)
            if self.occupancy is not None:  # what it may not know yet (one of us is new)
                for channel, user in self.occupancy.holdings():
                    peer.send(occupancy_record(channel, user, True, ALREADY))
            self.outgoing[worker] = peer
            for channel in [c for c in self.interest[worker] if c.startswith(WATCH_PREFIX)]:
                self.send_present(worker, channel)  # it watched them before we connected
            self.check_joined()
            replaced = self._replaced[worker] = loop.create_future()
            await asyncio.wait((peer.lost, replaced), return_when=asyncio.FIRST_COMPLETED)
            del self.outgoing[worker]
            if not peer.lost.done():
                self.retiring.append(peer)
                peer.lost.add_done_callback(functools.partial(self._retired, peer))

    def check_joined(self) -> None:
        """joined_all, once linked both ways with every other worker (see __init__)."""
        self.joined_all = self.joined_all or (len(self.outgoing) == len(self.interest)
                                              and len(self.incoming) == len(self.interest))

    def _retired(self, peer: Outgoing, _: asyncio.Future[None]) -> None:
        self.retiring.remove(peer)

    def replaced(self, worker: int) -> None:
        """A new worker took `worker`'s place (a rolling restart) while the old one still
        serves: connect to the new one, at the same path, and keep the old link until the
        old worker goes, so that the clients of both hear ours meanwhile."""
        future = self._replaced.get(worker)
        if future is not None and not future.done():
            future.set_result(None)

    def send_present(self, worker: int, watch: str) -> None:
        """Our subscribers of the channel that `watch` (its join/leave channel) is about, to a
        worker that begins to watch it (or that we connect to, watching it): their joins
        may have come before it watched, and should we die, it sends its watchers the leave
        of every one (peers.Incoming.connection_lost). On the stream of our joins and
        leaves to it, so that those after this come after it."""
        peer = self.outgoing.get(worker)
        if peer is None:
            return  # sent once we are connected to it (_stay_connected)
        channel = watch[len(WATCH_PREFIX):]
        present = (self.hub.presence_of(channel) if self.hub.presence_channels.allows(channel)
                   else [])
        parts: list[bytes] = []
        size, flag = 0, FIRST_PART
        for index, entry in enumerate(present):
            parts.append(encode(entry))
            size += len(parts[-1])
            if size >= PRESENT_PART_BYTES or index == len(present) - 1:
                peer.send(record(Kind.PRESENT, watch.encode(),
                                 bytes((flag,)) + b"[" + b",".join(parts) + b"]"))
                parts, size, flag = [], 0, 0
        if flag:  # nobody: what it knew of the channel from us is gone
            peer.send(record(Kind.PRESENT, watch.encode(), bytes((flag,)) + b"[]"))

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
        for peer in self.retiring:
            if peer.worker != skip and channel in self.interest[peer.worker]:
                peer.send(record(Kind.PUBLISH, channel.encode(), payload))

    def publish_history(self, channel: str, payload: bytes, ack: Acknowledger | None,
                        request_id: bytes, exclude: Outbox | None = None) -> int:
        return self.history.publish(channel, payload, ack, request_id, exclude)

    def read_history(self, channel: str, since: int, limit: int,
                     answer: Callable[[HistoryAnswer | None], None]) -> None:
        self.history.read(channel, since, limit, answer)

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
        if self.occupancy is not None:
            self.occupancy.subscribed(channel)
        waiting = False
        for peer in [*self.outgoing.values(), *self.retiring]:
            waiting = peer.subscribe(channel) or waiting
        return waiting

    def answered(self, channel: str) -> None:
        """A worker answered (or left): confirm once no worker still owes an answer."""
        if not any(channel in peer.unanswered
                   for peer in [*self.outgoing.values(), *self.retiring]):
            self.hub.confirm(channel)

    def joined(self, channel: str, client_id: bytes, user: str, info: str,
               metadata: str = "") -> None:
        """Presence is the subscriber arrays: gather_presence asks for them."""
        if self.occupancy is not None:
            self.occupancy.joined(channel, client_id, user)

    def left(self, channel: str, client_id: bytes) -> None:
        """See joined."""
        if self.occupancy is not None:
            self.occupancy.left(channel, client_id)

    # Transitions (webhooks) -------------------------------------------------------------

    def watch_transitions(self, listener: Transitions) -> None:
        """Every worker sends its edges to every other one (OCCUPANCY), so that each knows
        every worker's holdings (Holders); the lowest-numbered worker alive tells the
        listener. When a worker dies the others withdraw its holdings: if it led, the next
        one leads and tells what that empties."""
        self.transitions = listener
        self.occupancy = LocalOccupancy(self._edge)

    def leads(self, without: int = -1) -> bool:
        """Whether this worker tells the transitions: once it has reached every other
        worker, the lowest-numbered of the workers alive (but `without`, just gone) that
        have run SETTLE, or of all of them if none has. A worker back from a restart so
        leads only once it knows what the others hold; until then the one before goes on.
        (A worker we reach but have not heard from yet counts as settled.)"""
        if not self.joined_all:
            return False
        started = {worker: 0.0 for worker in self.outgoing}
        started.update((worker, peer.started_at) for worker, peer in self.incoming.items())
        started[self.worker] = self.started_at
        started.pop(without, None)
        now = time.time()
        settled = [worker for worker, at in started.items() if now - at >= SETTLE]
        return self.worker == min(settled or started)

    def _edge(self, channel: str, user: str | None, on: bool) -> None:
        data = occupancy_record(channel, user, on)
        for peer in self.outgoing.values():
            peer.send(data)
        self.edge_of(self.worker, channel, user, on)

    def edge_of(self, worker: int, channel: str, user: str | None, on: bool,
                news: bool = True) -> None:
        """Worker `worker`'s edge; `news`: not something it held before we knew it."""
        if self.holders.apply(worker, channel, user, on) and news and self.leads() \
                and self.transitions is not None:
            tell(self.transitions, channel, user, on)

    def withdraw(self, worker: int, gone: bool = False) -> None:
        """Worker `worker` is `gone` (or back as a new process): its holdings go."""
        emptied = self.holders.withdraw(worker)
        if self.transitions is not None and self.leads(worker if gone else -1):
            for channel, user in emptied:
                tell(self.transitions, channel, user, False)

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
        if self.occupancy is not None:
            self.occupancy.unsubscribed(channel)
        data = record(Kind.UNSUBSCRIBE, channel.encode())
        for peer in self.outgoing.values():
            peer.send(data)
        for incoming in self.incoming.values():  # nobody here watches it to need them
            incoming.joined.pop(channel, None)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._listener is not None:
            self._listener.close()
            path = address(self.sockets, self.worker)
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == self._bound:
                    os.unlink(path)
                os.rmdir(self.sockets)  # the last worker out, if the master cannot


def occupancy_record(channel: str, user: str | None, on: bool, flags: int = 0) -> bytes:
    flags |= HOLDS if on else 0
    if user is None:
        return record(Kind.OCCUPANCY, channel.encode(), bytes((flags,)))
    return record(Kind.OCCUPANCY, channel.encode(), bytes((flags | MEMBER,)) + user.encode())
