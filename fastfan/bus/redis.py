"""The Redis bus: nodes on many machines share channels through Redis pub/sub.

Each worker holds two connections. Publishing goes through redis-py (hiredis parser): one
task sends whatever was published during a loop turn as one pipeline, in order, on one
connection. Subscribing is our own connection on uvloop whose bytes `hiredis.Reader`
parses; each pushed message goes straight to `Hub.fanout`.

The Redis channel is `--redis-prefix` + channel, and the payload is the `message` object
exactly as subscribers receive it, so any backend can `PUBLISH fastfan:news '{...}'`.
A worker SUBSCRIBEs to a channel while it has local subscribers for it (bursts go out as
one command per loop turn), and after a reconnect (backoff min(attempt x 50 ms, 2 s))
subscribes to all of them again. Until Redis answers, publishes get 503 and /ready 503.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import msgspec
import redis.asyncio as aioredis

from .._core import Hub, Session
from . import PENDING, REFUSED

log = logging.getLogger("fastfan.redis")

# Publishes waiting for the pipeline while Redis is slow; past this, publishes get 503
# rather than growing the worker's memory.
MAX_QUEUED_PUBLISHES = 100_000
CONNECT_TIMEOUT = 2.0

_is_json_object = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode


def _command(*parts: bytes) -> bytes:
    """A command in RESP, as Redis reads it."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def reconnect_delay(attempt: int) -> float:
    return min(attempt * 0.05, 2.0)


class Subscriber(asyncio.Protocol):
    """The subscribing connection: pushes in, parsed by hiredis, fanned out."""

    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus
        self.reader = hiredis.Reader()
        self.transport: Any = None
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()  # the PING after AUTH and SUBSCRIBE came back
        self.lost = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, list) and reply[0] == b"message":
                self.bus.on_message(reply[1], reply[2])
            elif reply == b"PONG" or (isinstance(reply, list) and reply[0] == b"pong"):
                # PING's answer: a list once subscribed to something, else a status
                if not self.ready.done():
                    self.ready.set_result(None)
            elif isinstance(reply, hiredis.ReplyError):
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(f"redis refused us: {reply}"))
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection closed"))
        if not self.lost.done():
            self.lost.set_result(None)


class RedisBus:
    def __init__(self, hub: Hub, url: str, prefix: str) -> None:
        self.hub = hub
        self.url = url
        self.prefix = prefix.encode()
        self.up = False
        self._reported: bool | None = None  # the state last logged
        self.dropped_total = 0       # messages Redis could not take (lost in a failed batch)
        self.invalid_total = 0       # payloads from Redis that were not a JSON object
        self._publisher = aioredis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT)
        # (redis channel, payload, session to acknowledge or None, its request id)
        self._queue: deque[tuple[bytes, bytes, Session | None, bytes]] = deque()
        self._queued = asyncio.Event()
        self._subscriber: Subscriber | None = None
        self._changes: dict[bytes, bool] = {}  # channel -> subscribe (True) / unsubscribe
        self._changes_scheduled = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._stay_subscribed()),
                       loop.create_task(self._publish_forever())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._subscriber is not None and self._subscriber.transport is not None:
            self._subscriber.transport.close()
        await self._publisher.aclose()

    # Publishing ---------------------------------------------------------------------

    def publish(self, channel: str, payload: bytes, session: Session | None,
                request_id: bytes) -> int:
        """Queued for the next pipeline; a `published` reply waits for Redis's answer."""
        if not self.up or len(self._queue) >= MAX_QUEUED_PUBLISHES:
            return REFUSED
        self._queue.append((self.prefix + channel.encode(), payload, session, request_id))
        self._queued.set()
        return PENDING

    async def _publish_forever(self) -> None:
        """One pipeline per batch, one batch at a time: the publishers' order is kept."""
        while True:
            await self._queued.wait()
            self._queued.clear()
            batch = list(self._queue)
            self._queue.clear()
            pipe = self._publisher.pipeline(transaction=False)
            for channel, payload, _, _ in batch:
                pipe.publish(channel, payload)
            try:
                await pipe.execute()
                ok = True
            except (aioredis.RedisError, OSError) as exc:
                ok = False
                self.dropped_total += len(batch)
                self._went_down(f"publish failed: {exc}")
            prefix = len(self.prefix)
            for channel, _, session, request_id in batch:
                if session is not None:
                    session.acknowledge(channel[prefix:].decode("ascii"), request_id, ok)

    # Subscribing --------------------------------------------------------------------

    def subscribe(self, channel: str) -> None:
        self._change(channel, True)

    def unsubscribe(self, channel: str) -> None:
        self._change(channel, False)

    def _change(self, channel: str, subscribe: bool) -> None:
        self._changes[self.prefix + channel.encode()] = subscribe
        if not self._changes_scheduled:
            self._changes_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_changes)

    def _send_changes(self) -> None:
        """This loop turn's subscribes as one SUBSCRIBE, its unsubscribes as one UNSUBSCRIBE."""
        self._changes_scheduled = False
        changes, self._changes = self._changes, {}
        subscriber = self._subscriber
        if subscriber is None:
            return  # on reconnect every live channel is subscribed again
        added = [c for c, on in changes.items() if on]
        removed = [c for c, on in changes.items() if not on]
        if added:
            subscriber.transport.write(_command(b"SUBSCRIBE", *added))
        if removed:
            subscriber.transport.write(_command(b"UNSUBSCRIBE", *removed))

    def on_message(self, channel: bytes, payload: bytes) -> None:
        try:
            _is_json_object(payload)
        except (msgspec.DecodeError, RecursionError):
            self.invalid_total += 1
            return
        self.hub.fanout(channel[len(self.prefix):].decode("ascii"), payload)

    async def _stay_subscribed(self) -> None:
        attempt = 0
        while True:
            try:
                subscriber = await self._connect()
                await asyncio.wait_for(subscriber.ready, CONNECT_TIMEOUT)
                await self._publisher.ping()
            except (TimeoutError, OSError, aioredis.RedisError) as exc:
                if self._subscriber is not None and self._subscriber.transport is not None:
                    self._subscriber.transport.close()
                self._subscriber = None
                attempt += 1
                self._went_down(f"cannot reach redis: {exc}")
                await asyncio.sleep(reconnect_delay(attempt))
                continue
            attempt = 0
            self.up = True
            self._report(True, f"{len(self.hub.channels)} channels subscribed")
            await subscriber.lost
            self._subscriber = None
            self._went_down("connection to redis lost")

    async def _connect(self) -> Subscriber:
        loop = asyncio.get_running_loop()
        parts = urlsplit(self.url)
        tls = ssl.create_default_context() if parts.scheme == "rediss" else None
        _, subscriber = await asyncio.wait_for(loop.create_connection(
            lambda: Subscriber(self), parts.hostname or "localhost", parts.port or 6379,
            ssl=tls), CONNECT_TIMEOUT)
        commands = []
        if parts.password is not None:
            credentials = [unquote(parts.password).encode()]
            if parts.username:
                credentials.insert(0, unquote(parts.username).encode())
            commands.append(_command(b"AUTH", *credentials))
        channels = [self.prefix + name.encode() for name in self.hub.channels]
        if channels:
            commands.append(_command(b"SUBSCRIBE", *channels))
        commands.append(_command(b"PING"))  # answered only once the above are done
        subscriber.transport.write(b"".join(commands))
        self._subscriber = subscriber  # from here on, channel changes go to this connection
        return subscriber

    def _went_down(self, reason: str) -> None:
        self.up = False
        self._report(False, f"{reason}; publishes answer 503 until it is back")

    def _report(self, up: bool, detail: str) -> None:
        """One log line per change of state, not one per failed attempt."""
        if self._reported != up:
            self._reported = up
            if up:
                log.info("redis up: %s", detail)
            else:
                log.warning("redis down: %s", detail)
