"""Message buses: how a publish on one worker reaches the Hubs of every worker.

A bus has `publish(channel, payload, session, request_id)`, which answers REFUSED (the
bus is down: the client gets 503), DONE (handed on: a `published` reply may go at once),
or PENDING (the bus calls `session.acknowledge(channel, request_id, ok)` once it knows;
only when a session is given, i.e. the client asked for an acknowledgement),
`subscribe(channel)` and `unsubscribe(channel)` (a Hub calls them when a channel gains its
first or loses its last local subscriber; `subscribe` answers True when the bus will call
`hub.confirm(channel)` once every message published anywhere afterwards reaches this
worker: until then the clients' `subscribed` replies wait), `up` for /ready,
`dropped_total` for what it could not pass on, and `start()` / `stop()`.
"""

from __future__ import annotations

from typing import Any, Protocol

from .._core import BusResult

REFUSED, DONE, PENDING = BusResult.REFUSED, BusResult.DONE, BusResult.PENDING


class Bus(Protocol):
    up: bool
    dropped_total: int

    def publish(self, channel: str, payload: bytes, session: Any, request_id: bytes) -> int: ...
    def subscribe(self, channel: str) -> bool: ...
    def unsubscribe(self, channel: str) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
