"""The embedded bus of a single worker: a publish is fanned out on the spot."""

from __future__ import annotations

from typing import Any

from .._core import Hub
from . import DONE, apply_command


class LocalBus:
    up = True
    dropped_total = 0

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._fanout = hub.fanout

    async def start(self) -> None:
        """Nothing to connect to."""

    async def stop(self) -> None:
        """Nothing to disconnect from."""

    def publish(self, channel: str, payload: bytes, session: Any, request_id: bytes) -> int:
        self._fanout(channel, payload)
        return DONE

    def subscribe(self, channel: str) -> bool:
        """Every message already passes through this process: nothing to wait for."""
        return False

    def unsubscribe(self, channel: str) -> None:
        """See subscribe."""

    def command(self, payload: bytes, session: Any) -> int:
        """This worker's clients are all there are."""
        apply_command(self._hub, payload)
        return DONE
