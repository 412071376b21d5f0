"""The embedded bus of a single worker: a publish is fanned out on the spot."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .._core import Outbox
from ..directory import Counts, Node
from ..history import HistoryAnswer, HistoryFullError, HistoryStore, position
from .base import DONE, PENDING, Acknowledger, Bus, BusHealth, HubLink, Presence
from .commands import apply_command

# How often the history store forgets what has expired.
HISTORY_SWEEP_INTERVAL = 10.0

UP = BusHealth(up=True)


class LocalBus(Bus):
    def __init__(self, hub: HubLink, node: Node, *, history_ttl: float = 300.0) -> None:
        self._hub = hub
        self._fanout = hub.fanout
        self._node = node
        self.history = HistoryStore(hub.history_size, history_ttl, hub.history_max_bytes)
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Nothing to connect to; the history store's sweep, if there is history."""
        if self._hub.history_size:
            self._sweeper = asyncio.get_running_loop().create_task(
                sweep_forever(self.history))

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    def publish(self, channel: str, payload: bytes, ack: Acknowledger | None,
                request_id: bytes, exclude: Outbox | None = None) -> int:
        self._fanout(channel, payload, exclude)
        if self.message_tap is not None:
            self.message_tap(channel, payload)
        return DONE

    def publish_history(self, channel: str, payload: bytes, ack: Acknowledger | None,
                        request_id: bytes, exclude: Outbox | None = None) -> int:
        """Numbered, kept and fanned out; acknowledged (if asked) with its position, or
        refused when the store is full."""
        def fanout(numbered: bytes) -> None:
            self._fanout(channel, numbered, exclude)
            if self.message_tap is not None:
                self.message_tap(channel, numbered)

        return sequence_here(self.history, channel, payload, ack, request_id, fanout)

    def read_history(self, channel: str, since: int, limit: int,
                     answer: Callable[[HistoryAnswer | None], None]) -> None:
        """Answered at once: in this process a read falls between two messages."""
        answer(self.history.read(channel, since, limit))

    def subscribe(self, channel: str) -> bool:
        """Every message already passes through this process: nothing to wait for."""
        return False

    def unsubscribe(self, channel: str) -> None:
        """See subscribe."""

    def command(self, payload: bytes, ack: Acknowledger | None) -> int:
        """This worker's clients are all there are."""
        apply_command(self._hub, payload)
        return DONE

    def joined(self, channel: str, client_id: bytes, user: str, info: str,
               metadata: str = "") -> None:
        """Presence is the subscriber arrays: gather_presence asks for them."""

    def left(self, channel: str, client_id: bytes) -> None:
        """See joined."""

    def gather_presence(self, channel: str, answer: Callable[[Presence | None], None]) -> None:
        answer(self._hub.presence_part(channel, self._hub.presence_limit))

    def gather_channels(self, pattern: str | None, limit: int, local: Counts,
                        answer: Callable[[Counts | None], None]) -> None:
        answer(local)

    async def nodes(self) -> list[dict[str, Any]]:
        return [self._node.describe()]

    def health(self) -> BusHealth:
        return UP


def sequence_here(history: HistoryStore, channel: str, payload: bytes,
                  ack: Acknowledger | None, request_id: bytes,
                  fanout: Callable[[bytes], object]) -> int:
    """A publish on a channel whose history this worker keeps: numbered, kept, handed to
    `fanout`, and acknowledged (if asked) with its position; or refused when the store is
    full (HistoryFullError). PENDING: the acknowledgement is made."""
    try:
        offset, epoch, numbered = history.sequence(channel, payload)
    except HistoryFullError as full:
        if ack is not None:
            ack.acknowledge(channel, request_id, False, refusal=str(full))
        return PENDING
    fanout(numbered)
    if ack is not None:
        ack.acknowledge(channel, request_id, True, position(offset, epoch))
    return PENDING


async def sweep_forever(history: HistoryStore) -> None:
    while True:
        await asyncio.sleep(HISTORY_SWEEP_INTERVAL)
        history.sweep()
