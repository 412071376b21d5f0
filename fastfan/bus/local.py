"""The embedded bus of a single worker: a publish is fanned out on the spot."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .._core import Outbox
from ..directory import Counts, Node
from ..history import HistoryAnswer, HistoryStore
from ..history.local import sequence_here, sweep_forever
from ..webhooks.occupancy import LocalOccupancy, tell
from .base import DONE, Acknowledger, Bus, BusHealth, HubLink, Presence, Transitions
from .commands import apply_command

UP = BusHealth(up=True)


class LocalBus(Bus):
    def __init__(self, hub: HubLink, node: Node, *, history_ttl: float = 300.0) -> None:
        self._hub = hub
        self._fanout = hub.fanout
        self._node = node
        self.history = HistoryStore(hub.history_size, history_ttl, hub.history_max_bytes,
                                    hub.namespace_table)
        self._sweeper: asyncio.Task[None] | None = None
        self.occupancy: LocalOccupancy | None = None  # with webhooks

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
        if self.occupancy is not None:
            self.occupancy.subscribed(channel)
        return False

    def unsubscribe(self, channel: str) -> None:
        """See subscribe."""
        if self.occupancy is not None:
            self.occupancy.unsubscribed(channel)

    def command(self, payload: bytes, ack: Acknowledger | None) -> int:
        """This worker's clients are all there are."""
        apply_command(self._hub, payload)
        return DONE

    def joined(self, channel: str, client_id: bytes, user: str, info: str,
               metadata: str = "") -> None:
        """Presence is the subscriber arrays: gather_presence asks for them."""
        if self.occupancy is not None:
            self.occupancy.joined(channel, client_id, user)

    def left(self, channel: str, client_id: bytes) -> None:
        """See joined."""
        if self.occupancy is not None:
            self.occupancy.left(channel, client_id)

    def watch_transitions(self, listener: Transitions) -> None:
        """This worker is the deployment: each of its edges is a transition."""
        self.occupancy = LocalOccupancy(
            lambda channel, user, on: tell(listener, channel, user, on))

    def gather_presence(self, channel: str, answer: Callable[[Presence | None], None]) -> None:
        answer(self._hub.presence_part(channel, self._hub.presence_limit))

    def gather_channels(self, pattern: str | None, limit: int, local: Counts,
                        answer: Callable[[Counts | None], None]) -> None:
        answer(local)

    async def nodes(self) -> list[dict[str, Any]]:
        return [self._node.describe()]

    def health(self) -> BusHealth:
        return UP

