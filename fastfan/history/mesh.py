"""History on the embedded bus of several workers: each channel's owner worker
(`owner_of`) numbers and keeps its messages in a HistoryStore; the other workers send it
their publishes (SEQUENCE, answered SEQUENCED) and their reads (HISTORY, answered
HISTORY_ANSWER on the owner's stream of publishes to the reader: after every message up to
the read's position, before every later one). See fastfan.bus.mesh for the records."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from .._core import Outbox
from ..bus.base import PENDING, REFUSED, Acknowledger
from ..bus.mesh.wire import (
    MAX_READ_LIMIT,
    NO_ECHO,
    READ,
    SEQUENCED_ANSWER,
    TOKEN,
    Kind,
    decode_history,
    encode,
    record,
)
from . import HistoryAnswer, HistoryFullError, HistoryStore, ReadLimiter, owner_of, position
from .local import sequence_here

if TYPE_CHECKING:
    from ..bus.mesh.bus import MeshBus

log = logging.getLogger("fastfan.bus")

# An owner that has not answered a history read in this long fails it (503, try again).
READ_TIMEOUT = 2.0
# Publishes sent to their owner and not acknowledged yet; past this many (an owner that
# died with them), the oldest are forgotten: an "echo":false publisher may then receive
# its own message, never lose one.
MAX_UNACKNOWLEDGED = 10_000


class MeshHistory:
    """One worker's part: the store of the channels it owns, and its publishes and reads
    out to the other owners."""

    def __init__(self, bus: MeshBus, store: HistoryStore, max_message_size: int,
                 envelope_margin: int) -> None:
        self._bus = bus
        self.store = store
        # the largest HISTORY_ANSWER record a peer may send
        self.max_answer = 2 + 255 + 4 + 64 + store.size * (
            max_message_size + envelope_margin + 32)
        # publishes out to their owner: token -> (who waits, request id) to acknowledge, and
        # token -> publisher to skip when its message comes back ("echo":false)
        self._acknowledging: dict[int, tuple[Acknowledger, bytes, int]] = {}
        self._unechoed: dict[int, Outbox] = {}
        self._next_token = 0
        self._reads: dict[int, Callable[[HistoryAnswer | None], None]] = {}
        self._read_limiter = ReadLimiter()  # of the reads sent to other workers
        self._next_query = 0

    def publish(self, channel: str, payload: bytes, ack: Acknowledger | None,
                request_id: bytes, exclude: Outbox | None = None) -> int:
        """To the channel's owner, to be numbered; acknowledged with its position."""
        owner = owner_of(channel, self._bus.workers)
        if owner == self._bus.worker:
            def fanout(numbered: bytes) -> None:
                self._bus.hub.fanout(channel, numbered, exclude)
                self._bus._forward(channel, numbered)
                if self._bus.message_tap is not None:
                    self._bus.message_tap(channel, numbered)

            return sequence_here(self.store, channel, payload, ack, request_id, fanout)
        peer = self._bus.outgoing.get(owner)
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
        if owner_of(channel, self._bus.workers) != self._bus.worker:
            log.warning("bus: worker %d sent a publish on %s to number, which worker %d owns",
                        origin, channel, owner_of(channel, self._bus.workers))
            return b""
        try:
            offset, epoch, numbered = self.store.sequence(channel, payload)
        except HistoryFullError:
            return record(Kind.SEQUENCED, channel.encode(), SEQUENCED_ANSWER.pack(token, 0, 0)) \
                if token else b""
        self._bus.hub.fanout(channel, numbered)
        returned = 0
        if no_echo and channel in self._bus.interest[origin] and origin in self._bus.outgoing:
            returned = int(self._bus.outgoing[origin].send(record(
                Kind.PUBLISH_EXCLUDING, channel.encode(), TOKEN.pack(token) + numbered)))
            self._bus._forward(channel, numbered, skip=origin)
        else:
            self._bus._forward(channel, numbered)
        if self._bus.message_tap is not None:
            self._bus.message_tap(channel, numbered)
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
                            refusal=str(HistoryFullError(self.store.max_bytes)))

    def owner_lost(self, worker: int) -> None:
        """Our connection to a worker went: the publishes it had not acknowledged may or may
        not have gone out; their publishers hear 503."""
        for token, (ack, request_id, owner) in list(self._acknowledging.items()):
            if owner == worker:
                del self._acknowledging[token]
                ack.acknowledge("", request_id, False)

    def returned(self, channel: str, token: int, payload: bytes) -> None:
        """Our "echo":false publish, numbered, back for our other subscribers."""
        self._bus.hub.fanout(channel, payload, self._unechoed.pop(token, None))

    def read(self, channel: str, since: int, limit: int,
             answer: Callable[[HistoryAnswer | None], None]) -> None:
        owner = owner_of(channel, self._bus.workers)
        if owner == self._bus.worker:
            answer(self.store.read(channel, since, limit))
            return
        self._read_limiter.submit(
            functools.partial(self._send_read, owner, channel, since, limit, answer),
            functools.partial(answer, None))

    def _send_read(self, owner: int, channel: str, since: int, limit: int,
                   answer: Callable[[HistoryAnswer | None], None]) -> None:
        peer = self._bus.outgoing.get(owner)
        self._next_query += 1
        query = self._next_query
        if peer is None or not peer.send(record(Kind.HISTORY, channel.encode(), READ.pack(
                query, since, min(limit, MAX_READ_LIMIT)))):
            self._read_limiter.done()
            answer(None)
            return
        self._reads[query] = answer
        asyncio.get_running_loop().call_later(READ_TIMEOUT, self._read_timed_out, query)

    def read_for(self, worker: int, channel: str, query: int, since: int, limit: int) -> None:
        """As the owner: answer a worker's read on our stream of publishes to it."""
        peer = self._bus.outgoing.get(worker)
        if peer is None or owner_of(channel, self._bus.workers) != self._bus.worker:
            return  # it gives up after READ_TIMEOUT
        top, epoch, messages = self.store.read(channel, since, max(0, limit))
        peer.send(record(Kind.HISTORY_ANSWER, channel.encode(), TOKEN.pack(query) + encode(
            [top, epoch, [[offset, msgspec.Raw(message)] for offset, message in messages]])))

    def answered(self, query: int, payload: bytes) -> None:
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
