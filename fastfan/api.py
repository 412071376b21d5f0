"""The server API: an HTTP/1.1 port for backends and operators (--api-port, --api-key).

Every worker listens on the API port (SO_REUSEPORT, like the public port) and answers
`POST /api/METHOD` with a JSON body and `Authorization: apikey K`, plus `GET /metrics` and
`GET /health` without a key, and `GET /status` (a live page for a person) with its
`GET /status.json` under the key rule of fastfan.status. A publish goes through the worker's
Hub and bus exactly as a WebSocket client's does, with `from` set to "api".

`disconnect` and `unsubscribe` are commands on the bus (fastfan.bus.encode_command): every
worker of every node applies them to its own clients. `presence` and `presence_stats`
gather as the WebSocket requests do (the bus's gather_presence).

`channels` gathers every worker's channel counts over the bus (gather_channels: the
embedded bus's CHANNELS records, Redis's directory, fastfan.bus.redis_directory) and adds
them up; `info` describes this node from the figures its workers share and, with Redis,
every node in the registry.

HTTP is parsed by httptools (llhttp); requests on one connection are answered in order.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, NoReturn, TypeVar

import httptools
import msgspec

from . import directory, status
from ._core import BusResult, Hub, is_valid_channel
from .auth import MAX_TOKEN_LENGTH
from .bus import encode_command
from .bus.base import Presence
from .config import Config
from .directory import Node
from .history import HistoryAnswer
from .protocol import NO_VALUE

log = logging.getLogger("fastfan.api")

# Room in a request body beyond --max-message-size: the JSON around `data` and, for
# broadcast, the list of channels. Larger bodies get 413 and the connection closes.
BODY_ENVELOPE = 64 * 1024
# Request line and headers together; a backend sends a handful of short ones.
MAX_HEAD_BYTES = 16 * 1024
# Requests a client may send ahead of our answers before we stop reading from it.
MAX_PIPELINED = 32
# A keep-alive connection that sends nothing for this long is closed.
IDLE_TIMEOUT = 60.0
# After an error answer that ends a connection, how long we go on reading (and dropping)
# what the client still sends: closing with unread data would reset the connection, and
# the client could lose the answer.
LINGER = 2.0
# How long a publish waits for a bus that confirms later (Redis) before answering 503.
CONFIRM_TIMEOUT = 5.0
# How long presence waits for every worker's and node's part before answering 503.
PRESENCE_TIMEOUT = 5.0
# The busiest channels each worker lists for the status page: summed across workers, the
# page's top ten are exact unless a channel is busy somewhere without being among a
# worker's busiest hundred.
STATUS_CHANNELS = 100
# The `from` of every message published through the API.
SENDER = b"api"
# Methods of the contract that a later increment implements.

_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
_HTML = b"text/html; charset=utf-8"


class ApiError(Exception):
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
    content_type: bytes = _JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def encode(self, keep_alive: bool) -> bytes:
        reason = HTTPStatus(self.status).phrase.encode()
        lines = [b"HTTP/1.1 %d %s" % (self.status, reason),
                 b"Content-Type: " + self.content_type,
                 b"Content-Length: %d" % len(self.body),
                 b"Connection: keep-alive" if keep_alive else b"Connection: close",
                 *(name + b": " + value for name, value in self.headers)]
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


def error_response(status: int, message: str,
                   headers: tuple[tuple[bytes, bytes], ...] = ()) -> Response:
    body = msgspec.json.encode({"error": {"code": status, "message": message}})
    return Response(status, body, headers=headers)


# Request bodies, as msgspec decodes them; `data` stays the exact bytes the caller sent.
class PublishBody(msgspec.Struct):
    channel: str
    data: msgspec.Raw = NO_VALUE


class BroadcastBody(msgspec.Struct):
    channels: list[str]
    data: msgspec.Raw = NO_VALUE


class ChannelsBody(msgspec.Struct):
    pattern: str | None = None


class InfoBody(msgspec.Struct):
    pass


class ChannelBody(msgspec.Struct):
    channel: str


class HistoryBody(msgspec.Struct):
    channel: str
    limit: int = 100
    since: int | None = None
    epoch: str | None = None


class UserBody(msgspec.Struct):
    user: str


class UserChannelBody(msgspec.Struct):
    user: str
    channel: str


class _Confirmation:
    """Stands in for a Session: a bus that confirms later (Redis) calls acknowledge()."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[bool] = loop.create_future()
        self.position: dict[str, Any] = {}  # a history channel's offset and epoch

    def acknowledge(self, channel: str, request_id: bytes, ok: bool,
                    position: bytes = b"") -> None:
        if position:
            self.position = json.loads(b"{" + position[1:] + b"}")
        if not self.done.done():
            self.done.set_result(ok)


Method = Callable[[bytes], Awaitable[Any]]


class Api:
    """One worker's server API: the routes, the methods and the key."""

    def __init__(self, config: Config, hub: Hub, *, metrics: Callable[[], bytes],
                 figure_rows: Callable[[], list[dict[str, float]]], node: Node,
                 worker: int) -> None:
        assert config.api_key is not None
        self._config = config
        self._hub = hub
        self._metrics = metrics
        self._figure_rows = figure_rows  # SharedFigures.each(), this worker's row fresh
        self._worker = worker
        self._key = config.api_key.encode()
        self._node = node
        self.max_body = config.max_message_size + BODY_ENVELOPE
        self.connections: set[ApiConnection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._methods: dict[str, Method] = {
            "publish": self._publish, "broadcast": self._broadcast,
            "channels": self._channels, "info": self._info,
            "presence": self._presence, "presence_stats": self._presence_stats,
            "disconnect": self._disconnect, "unsubscribe": self._unsubscribe,
            "history": self._history,
        }

    async def start(self, backlog: int) -> None:
        config = self._config
        self._server = await asyncio.get_running_loop().create_server(
            lambda: ApiConnection(self), config.host, config.api_port,
            reuse_port=True,  # every worker binds the API port too; the kernel spreads calls
            backlog=backlog)
        log.info("server API on %s:%s", config.host, config.api_port)

    def close(self) -> None:
        """Stop accepting and close every connection (answers already written go out)."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.close()

    async def handle(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except ApiError as exc:
            return error_response(exc.status, str(exc), exc.headers)
        except Exception:
            log.exception("API request %s %s failed", request.method.decode(),  # no query:
                          request.url.partition(b"?")[0].decode("latin-1"))  # it may hold a key
            return error_response(500, "internal error; the server's log says more")

    async def _route(self, request: Request) -> Response:
        path, _, query = request.url.partition(b"?")
        if path in (b"/status", b"/status.json"):
            if request.method != b"GET":
                raise _not_allowed(b"GET")
            presented = status.presented_key(request.headers, query)
            if not status.may_view(request.peer, presented, self._key):
                raise ApiError(401, "missing or wrong API key: open /status?key=<key> or send "
                                    "'Authorization: apikey <key>' (none needed from localhost)")
            if path == b"/status":
                return Response(200, status.PAGE, _HTML, status.PAGE_HEADERS)
            return Response(200, msgspec.json.encode(await self._status()), _JSON,
                            ((b"Cache-Control", b"no-store"),))
        if path in (b"/metrics", b"/health"):
            if request.method != b"GET":
                raise _not_allowed(b"GET")
            if path == b"/health":
                return Response(200, b"ok\n", _TEXT)
            return Response(200, self._metrics(), _PROMETHEUS)
        if not path.startswith(b"/api/"):
            raise ApiError(404, f"no such path {path.decode('latin-1')!r}: "
                                "the API is POST /api/METHOD")
        if request.method != b"POST":
            raise _not_allowed(b"POST")
        self._check_key(request.headers.get(b"authorization"))
        name = path[5:].decode("latin-1")
        method = self._methods.get(name)
        if method is None:
            raise ApiError(404, f"unknown method {name!r}; methods: "
                                f"{', '.join(self._methods)}")
        result = await method(bytes(request.body))
        return Response(200, msgspec.json.encode({"result": result}))

    def _check_key(self, header: bytes | None) -> None:
        scheme, _, key = (header or b"").strip().partition(b" ")
        if scheme.lower() != b"apikey" or not hmac.compare_digest(key.strip(), self._key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: apikey <key>'")

    # Methods ---------------------------------------------------------------------------

    async def _publish(self, body: bytes) -> dict[str, Any]:
        request = _decode(body, PublishBody)
        _check_channel(request.channel)
        (position,) = await self._send([request.channel], _data_of(request.data))
        return position

    async def _broadcast(self, body: bytes) -> dict[str, Any]:
        request = _decode(body, BroadcastBody)
        if not request.channels:
            raise ApiError(400, "broadcast needs at least one channel in 'channels'")
        for channel in request.channels:
            _check_channel(channel)
        await self._send(request.channels, _data_of(request.data))
        return {}

    async def _channels(self, body: bytes) -> dict[str, Any]:
        """Every worker's and node's channels with their subscribers."""
        request = _decode(body, ChannelsBody)
        counts = await self._gather_channels(request.pattern, directory.MAX_LISTED)
        return {"channels": {name: {"subscribers": count} for name, count in counts.items()}}

    async def _gather_channels(self, pattern: str | None, limit: int) -> dict[str, int]:
        """The channels matching `pattern` on every worker and node (each one's `limit`
        busiest), summed; 503 when one does not answer."""
        gathered: asyncio.Future[directory.Counts | None] = (
            asyncio.get_running_loop().create_future())

        def answer(parts: directory.Counts | None) -> None:
            if not gathered.done():
                gathered.set_result(parts)

        self._hub.bus.gather_channels(pattern, limit,
                                      directory.channel_counts(self._hub.subscriber_counts(),
                                                               pattern, limit), answer)
        try:
            parts = await asyncio.wait_for(gathered, directory.GATHER_TIMEOUT + 1)
        except TimeoutError:
            parts = None
        if parts is None:
            raise ApiError(503, "channels unavailable: a worker or node did not answer (one "
                                "may have just stopped), try again")
        return directory.add_up(parts)

    async def _info(self, body: bytes) -> dict[str, Any]:
        """Every node: this one from the figures its workers share, with Redis the others
        from the registry (fastfan.bus.redis_directory)."""
        _decode(body, InfoBody)
        try:
            return {"nodes": await asyncio.wait_for(self._hub.bus.nodes(),
                                                    directory.GATHER_TIMEOUT)}
        except (TimeoutError, ConnectionError):
            raise ApiError(503, "info unavailable: Redis did not answer, try again") from None

    async def _presence(self, body: bytes) -> dict[str, Any]:
        return await self._gather_presence(body, stats_only=False)

    async def _presence_stats(self, body: bytes) -> dict[str, Any]:
        return await self._gather_presence(body, stats_only=True)

    async def _gather_presence(self, body: bytes, *, stats_only: bool) -> dict[str, Any]:
        """Every worker's and node's subscribers of the channel, as the WebSocket's
        `presence` gathers them (Session._presence), and the same `data`."""
        channel = _decode(body, ChannelBody).channel
        _check_channel(channel)
        hub = self._hub
        if not hub.presence_channels.allows(channel):
            raise ApiError(400, f"no presence is kept for {channel} (--presence-channels)")
        gathered: asyncio.Future[Presence | None] = asyncio.get_running_loop().create_future()

        def answer(presence: Presence | None) -> None:
            if not gathered.done():
                gathered.set_result(presence)

        hub.gather_presence(channel, answer)
        try:
            presence = await asyncio.wait_for(gathered, PRESENCE_TIMEOUT)
        except TimeoutError:
            presence = None
        if presence is None:
            raise ApiError(503, "presence unavailable: a worker or Redis did not answer, "
                                "try again")
        return hub.presence_data(presence, stats_only)

    async def _history(self, body: bytes) -> dict[str, Any]:
        """A channel's kept messages, as the WebSocket `history` request answers them."""
        request = _decode(body, HistoryBody)
        _check_channel(request.channel)
        if request.limit < 0 or (request.since is not None and request.since < 0):
            raise ApiError(400, "'limit' and 'since' must be 0 or more")
        hub = self._hub
        if not hub.keeps_history(request.channel):
            return {"offset": 0, "epoch": "", "messages": []}
        read: asyncio.Future[HistoryAnswer | None] = asyncio.get_running_loop().create_future()

        def answer(result: HistoryAnswer | None) -> None:
            if not read.done():
                read.set_result(result)

        hub.bus.read_history(request.channel, -1 if request.since is None else request.since,
                             min(request.limit, hub.history_size), answer)
        try:
            result = await asyncio.wait_for(read, CONFIRM_TIMEOUT)
        except TimeoutError:
            result = None
        if result is None:
            raise ApiError(503, "history unavailable: its store did not answer, try again")
        if request.since is not None and request.epoch is not None \
                and request.epoch != result.epoch:
            raise ApiError(409, f"epoch changed: {request.channel} is at epoch {result.epoch} "
                                "now, its history from before is gone")
        return {"offset": result.top, "epoch": result.epoch,
                "messages": [msgspec.Raw(message) for _, message in result.messages]}

    async def _disconnect(self, body: bytes) -> dict[str, Any]:
        """Every connection of the user, on every worker and node, closes with 4000."""
        user = _decode(body, UserBody).user
        _check_user(user)
        await self._command(encode_command("disconnect", user))
        return {}

    async def _unsubscribe(self, body: bytes) -> dict[str, Any]:
        """The user's subscriptions to the channel end, everywhere, with `unsubscribed`
        reason "server"."""
        request = _decode(body, UserChannelBody)
        _check_user(request.user)
        _check_channel(request.channel)
        await self._command(encode_command("unsubscribe", request.user, request.channel))
        return {}

    async def _command(self, payload: bytes) -> None:
        """Hand a command to the bus; answered once the bus has it (Redis: took the
        PUBLISH)."""
        confirmation = _Confirmation(asyncio.get_running_loop())
        outcome = self._hub.bus.command(payload, confirmation)
        if outcome == BusResult.REFUSED:
            raise ApiError(503, "message bus unavailable, try again (the command may have "
                                "reached some workers; it can be repeated)")
        if outcome == BusResult.PENDING:
            await _confirmed([confirmation.done], "the command")

    async def _status(self) -> dict[str, Any]:
        """/status.json: every worker's figures, and the busiest channels of the whole
        deployment (each worker's STATUS_CHANNELS busiest, summed), or of this worker
        when one does not answer (then `channels_everywhere` is false)."""
        try:
            channels = await self._gather_channels(None, STATUS_CHANNELS)
            everywhere = True
        except ApiError:
            channels, everywhere = self._hub.subscriber_counts(), False
        now = time.time()
        return status.document(
            self._figure_rows(), now=now, node=self._node.name,
            uptime=now - self._node.started, worker=self._worker,
            redis=self._config.redis is not None, channels=channels,
            channels_everywhere=everywhere)

    async def _send(self, channels: list[str], data: msgspec.Raw) -> list[dict[str, Any]]:
        """Each channel gets the message through the bus, as a WebSocket publish does.
        Returns, for each, its offset and epoch on a channel with history, else {}."""
        hub = self._hub
        loop = asyncio.get_running_loop()
        pending = []
        confirmations = []
        for sent, channel in enumerate(channels):
            confirmation = _Confirmation(loop)
            confirmations.append(confirmation)
            payload = hub.encode_message(channel, data, SENDER)
            publish = (hub.bus.publish_history if hub.keeps_history(channel)
                       else hub.bus.publish)
            outcome = publish(channel, payload, confirmation, b"")
            if outcome == BusResult.REFUSED:
                raise ApiError(503, "message bus unavailable, try again" + (
                    f" ({sent} of {len(channels)} channels were published)" if sent else ""))
            if outcome == BusResult.PENDING:
                pending.append(confirmation.done)
        if pending:
            await _confirmed(pending, "the message")
        return [confirmation.position for confirmation in confirmations]


async def _confirmed(pending: list[asyncio.Future[bool]], what: str) -> None:
    """Wait for a bus that confirms later (Redis); 503 if it does not, or says no."""
    try:
        confirmed = await asyncio.wait_for(asyncio.gather(*pending), CONFIRM_TIMEOUT)
    except TimeoutError:
        raise ApiError(503, f"message bus did not confirm in time; {what} may or may not "
                            "have been published") from None
    if not all(confirmed):
        raise ApiError(503, f"message bus unavailable; {what} was not published")


def _not_allowed(allowed: bytes) -> ApiError:
    return ApiError(405, f"method not allowed here; use {allowed.decode()}",
                    ((b"Allow", allowed),))


_Body = TypeVar("_Body")


def _decode(body: bytes, kind: type[_Body]) -> _Body:
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"bad body: {exc}") from None


def _check_channel(channel: str) -> None:
    if not is_valid_channel(channel):
        raise ApiError(400, f"invalid channel name {channel[:300]!r}: 1-255 characters "
                            "from A-Z a-z 0-9 _ - . : @ /")


def _check_user(user: str) -> None:
    if not user:
        raise ApiError(400, "'user' must be a non-empty string")
    if len(user.encode()) > MAX_TOKEN_LENGTH:  # a token's `sub` is shorter than the token
        raise ApiError(400, f"'user' is longer than a token ({MAX_TOKEN_LENGTH} bytes)")


def _data_of(data: msgspec.Raw) -> msgspec.Raw:
    if not data:
        raise ApiError(400, "missing 'data'")
    return data


class ApiConnection(asyncio.Protocol):
    """One HTTP/1.1 connection: parse with httptools, answer in order, keep alive."""

    def __init__(self, api: Api) -> None:
        self._api = api
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: Any = None  # uvloop's transports are not asyncio.Transport
        self._peer: str | None = None  # the client's IP address
        self._request = Request()
        self._head_bytes = 0
        self._refusal: ApiError | None = None  # a limit a callback hit; httptools wraps it
        self._queue: deque[Request | Response] = deque()
        self._serving: asyncio.Task[None] | None = None
        self._reading = True
        self._writable = asyncio.Event()  # clear while the client does not read our answers
        self._writable.set()
        self._closing = False  # no more requests are read; close once answered
        self._idle: asyncio.TimerHandle | None = None

    # asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else None
        self._api.connections.add(self)
        self._reset_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._api.connections.discard(self)
        self._transport = None
        if self._idle is not None:
            self._idle.cancel()
        if self._serving is not None:
            self._serving.cancel()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._reset_idle()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._queue and self._queue[-1] is self._request:
                self._queue.pop()  # answered by the refusal instead
            self._answer_and_close(error_response(400, "no upgrades on the API port"))
        except httptools.HttpParserError as exc:
            refusal = self._refusal or ApiError(400, f"bad HTTP request: {exc}")
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
        if length.isdigit() and int(length) > self._api.max_body:
            self._refuse(_too_large(self._api.max_body))

    def on_body(self, body: bytes) -> None:
        self._request.body += body
        if len(self._request.body) > self._api.max_body:
            self._refuse(_too_large(self._api.max_body))

    def on_message_complete(self) -> None:
        self._enqueue(self._request)

    # Answering, in order ----------------------------------------------------------------

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(ApiError(431, f"request line and headers over {MAX_HEAD_BYTES} bytes"))

    def _refuse(self, refusal: ApiError) -> NoReturn:
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
            response = await self._api.handle(item)
            if self._transport is None:
                break
            self._transport.write(response.encode(item.keep_alive))
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

    def _reset_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(IDLE_TIMEOUT, self.close)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body over {limit} bytes (--max-message-size plus "
                         f"{BODY_ENVELOPE} for the envelope)")


# A client for the shell (`fastfan publish`) and for scripts -------------------------------

class ApiCallError(Exception):
    """The call failed; str() is one line: the HTTP status and the server's message."""


def call(api_url: str, key: str, method: str, body: bytes, timeout: float = 10.0) -> Any:
    """POST /api/METHOD and return the `result`."""
    request = urllib.request.Request(
        api_url.rstrip("/") + "/api/" + method, data=body, method="POST",
        headers={"Authorization": f"apikey {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())["result"]
    except urllib.error.HTTPError as exc:
        message = _error_message(exc.read()) or exc.reason
        raise ApiCallError(f"{exc.code} {message}") from None
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiCallError(f"no answer from {api_url}: {reason}") from None


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""
