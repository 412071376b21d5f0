"""An HTTP/1.1 server for the API port: httptools (llhttp) parses, a handler answers.

It knows HTTP, not what is asked of it: every request goes to one handler, an async
callable from Request to Response (fastfan.api.Api.handle). Keep-alive and pipelining:
the requests of one connection are answered in order, one at a time. What a stranger may
cost is bounded here: the connections open at once, the size of a request's head and
body and the time they take to arrive, the requests queued ahead of our answers, the time
a connection may stay silent.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, NoReturn

import httptools
import msgspec

# Request line and headers together; a backend sends a handful of short ones.
MAX_HEAD_BYTES = 16 * 1024
# Requests a client may send ahead of our answers before we stop reading from it.
MAX_PIPELINED = 32
# A keep-alive connection that sends nothing for this long is closed.
IDLE_TIMEOUT = 60.0
# A request's line, headers and body arrive within this long of its first byte (a new
# connection's first request, of the accept), else 408 and the connection closes: a head
# trickled a byte at a time would otherwise hold a connection open for ever.
REQUEST_TIMEOUT = 10.0
# After an error answer that ends a connection, how long we go on reading (and dropping)
# what the client still sends: closing with unread data would reset the connection, and
# the client could lose the answer.
LINGER = 2.0

JSON = b"application/json"


class HttpError(Exception):
    """Answered as `{"error":{"code":status,"message":str(self)}}` with that HTTP status."""

    def __init__(self, status: int, message: str,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


@dataclass
class Request:
    method: bytes = b""
    url: bytes = b""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    keep_alive: bool = True
    peer: str | None = None  # the client's IP address


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def encode(self, keep_alive: bool, *, head: bool = False) -> bytes:
        """The response to send; to a HEAD, without the body (its length all the same)."""
        reason = HTTPStatus(self.status).phrase.encode()
        lines = [b"HTTP/1.1 %d %s" % (self.status, reason),
                 b"Content-Type: " + self.content_type,
                 b"Content-Length: %d" % len(self.body),
                 b"Connection: keep-alive" if keep_alive else b"Connection: close",
                 *(name + b": " + value for name, value in self.headers)]
        return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else self.body)


def error_response(status: int, message: str,
                   headers: tuple[tuple[bytes, bytes], ...] = ()) -> Response:
    body = msgspec.json.encode({"error": {"code": status, "message": message}})
    return Response(status, body, headers=headers)


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """Listens on a port and hands each request to `handler`.

    `max_body` bounds a request's body; a larger one gets 413, whose message names
    `body_limit`, what the limit is made of (for the caller to know which option). Past
    `max_connections` open at once, a new connection gets 503 and is closed.
    """

    def __init__(self, handler: Handler, *, max_body: int, body_limit: str,
                 max_connections: int) -> None:
        self.handler = handler
        self.max_body = max_body
        self.body_limit = body_limit
        self.max_connections = max_connections
        self.connections: set[HttpConnection] = set()
        self._servers: list[asyncio.Server] = []

    async def start(self, sockets: list[socket.socket], backlog: int) -> None:
        """Serve on `sockets`, listening already (bound by the master: master.listen)."""
        self._servers = [await asyncio.get_running_loop().create_server(
            lambda: HttpConnection(self), sock=sock, backlog=backlog) for sock in sockets]

    def close(self) -> None:
        """Stop accepting and close every connection (answers already written go out)."""
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.close()

    def too_large(self) -> HttpError:
        return HttpError(413, f"request body over {self.max_body} bytes ({self.body_limit})")


class HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 connection: parse with httptools, answer in order, keep alive."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: Any = None  # uvloop's transports are not asyncio.Transport
        self._peer: str | None = None  # the client's IP address
        self._request = Request()
        self._head_bytes = 0
        self._refusal: HttpError | None = None  # a limit a callback hit; httptools wraps it
        self._queue: deque[Request | Response] = deque()
        self._serving: asyncio.Task[None] | None = None
        self._reading = True
        self._writable = asyncio.Event()  # clear while the client does not read our answers
        self._writable.set()
        self._closing = False  # no more requests are read; close once answered
        # Closes the connection: IDLE_TIMEOUT between requests, REQUEST_TIMEOUT within one.
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else None
        if len(self._server.connections) >= self._server.max_connections:
            self._closing = True
            self._transport.write(error_response(
                503, f"the API port has {self._server.max_connections} connections open, "
                     "the most a worker takes; try again",
                ((b"Retry-After", b"1"),)).encode(keep_alive=False))
            self._transport.close()
            return
        self._server.connections.add(self)
        self._set_timer(REQUEST_TIMEOUT, self._request_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
        if self._serving is not None:
            self._serving.cancel()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._queue and self._queue[-1] is self._request:
                self._queue.pop()  # answered by the refusal instead
            self._answer_and_close(error_response(400, "no upgrades on the API port"))
        except httptools.HttpParserError as exc:
            refusal = self._refusal or HttpError(400, f"bad HTTP request: {exc}")
            self._answer_and_close(error_response(refusal.status, str(refusal)))

    def pause_writing(self) -> None:
        self._writable.clear()
        self._flow()

    def resume_writing(self) -> None:
        self._writable.set()
        self._flow()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._request = Request(peer=self._peer)
        self._head_bytes = 0
        self._set_timer(REQUEST_TIMEOUT, self._request_timed_out)

    def on_url(self, url: bytes) -> None:
        self._request.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        self._request.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        request = self._request
        request.method = self._parser.get_method()
        request.keep_alive = self._parser.should_keep_alive()
        length = request.headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self._server.max_body:
            self._refuse(self._server.too_large())

    def on_body(self, body: bytes) -> None:
        self._request.body += body
        if len(self._request.body) > self._server.max_body:
            self._refuse(self._server.too_large())

    def on_message_complete(self) -> None:
        self._set_timer(IDLE_TIMEOUT, self.close)
        self._enqueue(self._request)

    # Answering, in order ----------------------------------------------------------------

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(HttpError(431, f"request line and headers over {MAX_HEAD_BYTES} bytes"))

    def _refuse(self, refusal: HttpError) -> NoReturn:
        """Stop parsing: httptools raises its own error, and we answer with this one."""
        self._refusal = refusal
        raise refusal

    def _answer_and_close(self, response: Response) -> None:
        self._closing = True
        self._enqueue(response)

    def _enqueue(self, item: Request | Response) -> None:
        self._queue.append(item)
        self._flow()
        if self._serving is None:
            self._serving = self._loop.create_task(self._serve_queue())

    async def _serve_queue(self) -> None:
        while self._queue and self._transport is not None:
            await self._writable.wait()
            if self._transport is None:
                break
            item = self._queue.popleft()
            if isinstance(item, Response):
                self._transport.write(item.encode(keep_alive=False))
                self._linger()
                break
            response = await self._server.handler(item)
            if self._transport is None:
                break
            self._transport.write(response.encode(item.keep_alive,
                                                  head=item.method == b"HEAD"))
            if not item.keep_alive:
                self._closing = True
                self._transport.close()
                break
        self._serving = None
        self._flow()

    def _flow(self) -> None:
        """Read while the client reads our answers and has few requests waiting for one."""
        wanted = self._writable.is_set() and len(self._queue) < MAX_PIPELINED
        if wanted != self._reading and self._transport is not None:
            self._reading = wanted
            if wanted:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def _linger(self) -> None:
        """Half-close: the answer goes out, what still comes in is dropped, then close."""
        self._closing = True
        if self._transport.can_write_eof():
            self._transport.write_eof()
        self._queue.clear()
        self._flow()
        self._loop.call_later(LINGER, self.close)

    def _set_timer(self, delay: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(delay, callback)

    def _request_timed_out(self) -> None:
        if not self._closing:
            self._answer_and_close(error_response(
                408, f"the request did not arrive whole within {REQUEST_TIMEOUT:g} s"))
