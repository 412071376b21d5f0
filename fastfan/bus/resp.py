"""Redis's wire for the publishing path: commands encoded here, written straight to one
connection, replies parsed by hiredis and handed back in order.

Publishing went through redis-py's pipeline, about 20 µs of Python per PUBLISH (its
command packing, its response callbacks, a coroutine per batch): one node topped out at
20-26k messages/s through a Redis that takes 267k PUBLISH/s (issue #31). Here a batch is
one write, sent as soon as the loop turn that queued it ends, without waiting for the
previous batch's answer (Redis answers one connection's commands in order, so the
publishers' order holds); each reply acknowledges its publish as it arrives. What runs per
publish (its encoding, the answer to one nobody waits for) is compiled: bus/_resp.pyx."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

from ._resp import Publishes, answer_replies


def command(*parts: bytes) -> bytes:
    """A command in RESP, as Redis reads it."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


# What a command still waiting gets when the connection goes before its reply.
LOST = ConnectionError("connection to redis lost")


class Pipeline(asyncio.Protocol):
    """One connection to Redis whose commands are answered in order: each command sent
    comes with what waits for its reply (an entry `answer(entry, reply)` is called with,
    or a future), and gets its reply, an hiredis.ReplyError, or LOST."""

    def __init__(self, answer: Callable[[Any, Any], None],
                 publishes: Publishes | None = None) -> None:
        self._answer = answer
        self._publishes = publishes  # whose publishes nobody waits for are answered in C
        self.reader = hiredis.Reader()
        self.transport: Any = None  # uvloop's, which is no asyncio.Transport subclass
        self.loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.waiting: deque[Any] = deque()
        # when a reply last came, or when a command was sent while none waited: a Redis
        # that leaves the oldest command unanswered for long is stalled (stalled_for)
        self._progress = self.loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        if not answer_replies(self.reader, self.waiting, self._answer, self._publishes):
            self.close()  # a reply to nothing: not a Redis we can talk to
            return
        self._progress = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        waiting, self.waiting = self.waiting, deque()
        for entry in waiting:
            if isinstance(entry, asyncio.Future):
                if not entry.done():
                    entry.set_exception(LOST)
            else:
                self._answer(entry, LOST)
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, data: bytes, entries: list[Any]) -> None:
        """Commands encoded in `data`, one entry each, in order."""
        if not self.waiting:
            self._progress = self.loop.time()
        self.waiting.extend(entries)
        self.transport.write(data)

    async def call(self, *parts: bytes, timeout: float) -> Any:
        """One command and its reply (an hiredis.ReplyError is raised; a connection that
        is already closing raises ConnectionError, as one lost while waiting does)."""
        if not self.alive():  # (Redis closed it as it was made: restarting, say)
            raise ConnectionError("connection to redis lost")
        reply: asyncio.Future[Any] = self.loop.create_future()
        self.send(command(*parts), [reply])
        result = await asyncio.wait_for(reply, timeout)
        if isinstance(result, hiredis.ReplyError):
            raise result
        return result

    def stalled_for(self) -> float:
        """How long the oldest command has waited without any reply coming (0: none waits)."""
        return self.loop.time() - self._progress if self.waiting else 0.0

    def alive(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # connection_lost fails whatever waits


async def connect(url: str, answer: Callable[[Any, Any], None], timeout: float,
                  publishes: Publishes | None = None) -> Pipeline:
    """A Pipeline to the Redis of `url` (redis:// or rediss://), logged in (AUTH) and on
    its database (SELECT), as redis-py's client would be."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    tls = ssl.create_default_context() if parts.scheme == "rediss" else None
    _, pipeline = await asyncio.wait_for(loop.create_connection(
        lambda: Pipeline(answer, publishes), parts.hostname or "localhost", parts.port or 6379,
        ssl=tls), timeout)
    try:
        if parts.password is not None:
            credentials = [unquote(parts.password).encode()]
            if parts.username:
                credentials.insert(0, unquote(parts.username).encode())
            await pipeline.call(b"AUTH", *credentials, timeout=timeout)
        database = parts.path.strip("/")
        if database and database != "0":
            await pipeline.call(b"SELECT", database.encode(), timeout=timeout)
    except BaseException:
        pipeline.close()
        raise
    return pipeline
