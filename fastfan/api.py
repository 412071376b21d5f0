"""The server API: an HTTP/1.1 port for backends and operators (--api-port, --api-key).

Every worker listens on the API port (SO_REUSEPORT, like the public port) and answers
`POST /api/METHOD` with a JSON body and `Authorization: apikey K`, plus `GET /metrics`,
`GET /health` and `GET /ready` without a key, and `GET /status` (a live page for a person)
with its `GET /status.json` under the key rule of fastfan.status (HEAD too on each GET). A
publish goes through the worker's Hub and bus exactly as a WebSocket client's does, with
`from` set to "api".

`disconnect` and `unsubscribe` are commands on the bus (fastfan.bus.encode_command): every
worker of every node applies them to its own clients. `presence` and `presence_stats`
gather as the WebSocket requests do (the bus's gather_presence).

`channels` gathers every worker's channel counts over the bus (gather_channels: the
embedded bus's CHANNELS records, Redis's directory, fastfan.directory.redis) and adds
them up; `info` describes this node from the figures its workers share and, with Redis,
every node in the registry.

HTTP is fastfan.http_server's: this module is the handler it hands each request to.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from . import directory, errors, status
from ._core import BusResult, Hub, is_valid_channel
from .auth import MAX_TOKEN_LENGTH
from .bus import encode_command
from .bus.base import Presence
from .bus.gather import gathered
from .config import Config
from .directory import Node
from .history import HistoryAnswer
from .http_server import JSON as _JSON
from .http_server import HttpError, HttpServer, Request, Response, error_response
from .protocol import NO_VALUE, Position
from .pusher import BUS_PREFIX as PUSHER_PREFIX
from .pusher import event_from_api

log = logging.getLogger("fastfan.api")

# Room in a request body beyond --max-message-size: the JSON around `data` and, for
# broadcast, the list of channels. Larger bodies get 413 and the connection closes.
BODY_ENVELOPE = 64 * 1024
# API connections a worker holds open at once: a backend keeps a few pooled, each a file
# descriptor beside --max-connections, within the 256 a worker keeps for itself
# (fastfan.worker.FILES_RESERVED). Past it a connection gets 503.
MAX_CONNECTIONS = 128
# How long a publish waits for a bus that confirms later (Redis) before answering 503.
CONFIRM_TIMEOUT = 5.0
# How long presence waits for every worker's and node's part before answering 503.
PRESENCE_TIMEOUT = 5.0
# The busiest channels each worker lists for the status page: summed across workers, the
# page's top ten are exact unless a channel is busy somewhere without being among a
# worker's busiest hundred.
STATUS_CHANNELS = 100
# How long one /status.json answer serves every caller: the page asks once a second.
STATUS_CACHE = 1.0
# The `from` of every message published through the API.
SENDER = b"api"
# Methods of the contract that a later increment implements.

_READING = (b"GET", b"HEAD")  # the methods of the routes that only read
_TEXT = b"text/plain; charset=utf-8"
_PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
_HTML = b"text/html; charset=utf-8"


class ApiError(HttpError):
    """A method's or a route's refusal, answered as HttpError says."""


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
    limit: Position = 100
    since: Position | None = None
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
        self.refusal: str | None = None  # a full history store's (507)

    def acknowledge(self, channel: str, request_id: bytes, ok: bool,
                    position: bytes = b"", refusal: str | None = None) -> None:
        self.refusal = refusal
        if position:
            self.position = json.loads(b"{" + position[1:] + b"}")
        if not self.done.done():
            self.done.set_result(ok)


Method = Callable[[bytes], Awaitable[Any]]


class Api:
    """One worker's server API: the routes, the methods and the key."""

    def __init__(self, config: Config, hub: Hub, *, metrics: Callable[[], bytes],
                 figure_rows: Callable[[], list[dict[str, float]]], node: Node,
                 worker: int, why_not_ready: Callable[[], list[str]],
                 sockets: list[socket.socket]) -> None:
        assert config.api_key is not None
        self._config = config
        self._hub = hub
        self._metrics = metrics
        self._figure_rows = figure_rows  # SharedFigures.each(), this worker's row fresh
        self._worker = worker
        self._why_not_ready = why_not_ready
        self._sockets = sockets  # listening already, bound by the master (master.listen)
        self._key = config.api_key.encode()
        self._node = node
        self._status_cached: asyncio.Task[bytes] | None = None
        self._status_cached_at = 0.0  # loop time
        self._http = HttpServer(
            self.handle, max_body=config.max_message_size + BODY_ENVELOPE,
            body_limit=f"--max-message-size plus {BODY_ENVELOPE} for the envelope",
            max_connections=MAX_CONNECTIONS)
        self._methods: dict[str, Method] = {
            "publish": self._publish, "broadcast": self._broadcast,
            "channels": self._channels, "info": self._info,
            "presence": self._presence, "presence_stats": self._presence_stats,
            "disconnect": self._disconnect, "unsubscribe": self._unsubscribe,
            "history": self._history,
        }

    def reconfigure(self, config: Config) -> None:
        """A reload: the new API key from the next request on."""
        assert config.api_key is not None
        self._config = config
        self._key = config.api_key.encode()

    async def start(self, backlog: int) -> None:
        config = self._config
        await self._http.start(self._sockets, backlog)
        log.info("server API on %s:%s", config.api_listen_host, config.api_port)

    def close(self) -> None:
        """Stop accepting and close every connection (answers already written go out)."""
        self._http.close()

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
            if request.method not in _READING:
                raise _not_allowed(b"GET, HEAD")
            presented = status.presented_key(request.headers, query)
            # Keyless from the loopback only under a loopback name: DNS rebinding brings
            # another site's page to 127.0.0.1 under that site's name (fastfan.status).
            local_name = status.names_loopback(request.headers.get(b"host"))
            if not status.may_view(request.peer if local_name else None, presented, self._key):
                raise ApiError(401, "missing or wrong API key: open /status?key=<key> or send "
                                    "'Authorization: apikey <key>' (none needed from localhost)")
            if path == b"/status":
                return Response(200, status.PAGE, _HTML, status.PAGE_HEADERS)
            return Response(200, await self._status_answer(), _JSON,
                            ((b"Cache-Control", b"no-store"),))
        if path in (b"/metrics", b"/health", b"/ready"):
            if request.method not in _READING:
                raise _not_allowed(b"GET, HEAD")
            if path == b"/health":
                return Response(200, b"ok\n", _TEXT)
            if path == b"/ready":
                reasons = self._why_not_ready()  # as on the client port (fastfan.handshake)
                return Response(503, ", ".join(reasons).encode() + b"\n", _TEXT) \
                    if reasons else Response(200, b"ready\n", _TEXT)
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
        local = directory.channel_counts(self._hub.subscriber_counts(), pattern, limit)
        parts: directory.Counts | None = await gathered(
            lambda answer: self._hub.bus.gather_channels(pattern, limit, local, answer))
        if parts is None:
            raise ApiError(503, "channels unavailable: a worker or node did not answer (one "
                                "may have just stopped), try again")
        return directory.add_up(parts)

    async def _info(self, body: bytes) -> dict[str, Any]:
        """Every node: this one from the figures its workers share, with Redis the others
        from the registry (fastfan.directory.redis)."""
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
        if not (hub.presence_channels if hub.namespaces is None
                else hub.namespaces.presence_asked).allows(channel):
            raise ApiError(*errors.no_presence(channel))
        presence: Presence | None = await gathered(
            lambda answer: hub.gather_presence(channel, answer), PRESENCE_TIMEOUT)
        if presence is None:
            raise ApiError(*errors.PRESENCE_UNAVAILABLE)
        return hub.presence_data(presence, stats_only)

    async def _history(self, body: bytes) -> dict[str, Any]:
        """A channel's kept messages, as the WebSocket `history` request answers them."""
        request = _decode(body, HistoryBody)
        _check_channel(request.channel)
        if request.limit < 0 or (request.since is not None and request.since < 0):
            raise ApiError(*errors.NEGATIVE_POSITION)
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
            raise ApiError(*errors.HISTORY_UNAVAILABLE)
        if request.since is not None and request.epoch is not None \
                and request.epoch != result.epoch:
            raise ApiError(*errors.epoch_changed(request.channel, result.epoch))
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

    async def _status_answer(self) -> bytes:
        """/status.json, gathered at most once per STATUS_CACHE seconds: each gathering
        walks every worker's channel table (14.8 ms of CPU with 20,000 channels); callers
        within that time, or while it runs, share it."""
        loop = asyncio.get_running_loop()
        if self._status_cached is None or loop.time() - self._status_cached_at >= STATUS_CACHE:
            self._status_cached_at = loop.time()
            self._status_cached = loop.create_task(self._encoded_status())
        return await asyncio.shield(self._status_cached)  # a caller gone cancels only itself

    async def _encoded_status(self) -> bytes:
        return msgspec.json.encode(await self._status())

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
        return await send(self._hub, channels, data, SENDER, pusher=bool(self._config.pusher_app))


async def send(hub: Hub, channels: list[str], data: bytes, sender: bytes, *,
               pusher: bool = False) -> list[dict[str, Any]]:
    """Each channel gets the message through the bus, as a WebSocket publish does, from
    `sender` ("api"; "server" for app.publish); with `pusher` (Pusher apps served), a
    Pusher channel's as a Pusher event. Returns, for each, its offset and epoch on a
    channel with history, else {}."""
    if hub.overloaded:
        # Behind its output (--max-backlog): the publisher waits, not the subscribers.
        raise ApiError(503, "the server is behind its output (--max-backlog): try again "
                            "in a moment", ((b"Retry-After", b"1"),))
    loop = asyncio.get_running_loop()
    pending = []
    confirmations = []
    # (each made first: a Pusher channel's bad data refuses the request before any
    # channel has the message)
    payloads = [_pusher_event(channel, data)
                if pusher and channel.startswith(PUSHER_PREFIX)
                else hub.encode_message(channel, data, sender) for channel in channels]
    for sent, (channel, payload) in enumerate(zip(channels, payloads, strict=True)):
        confirmation = _Confirmation(loop)
        confirmations.append(confirmation)
        publish = (hub.bus.publish_history if hub.keeps_history(channel)
                   else hub.bus.publish)
        outcome = publish(channel, payload, confirmation, b"")
        if outcome == BusResult.REFUSED:
            raise ApiError(503, "message bus unavailable, try again" + (
                f" ({sent} of {len(channels)} channels were published)" if sent else ""))
        if outcome == BusResult.PENDING:
            pending.append(confirmation.done)
    if pending:
        try:
            await _confirmed(pending, "the message")
        except ApiError:
            for confirmation in confirmations:
                if confirmation.refusal is not None:  # a full history store's
                    raise ApiError(507, confirmation.refusal) from None
            raise
    return [confirmation.position for confirmation in confirmations]


def _pusher_event(channel: str, data: bytes) -> bytes:
    """A Pusher channel's subscribers get a Pusher event (fastfan.pusher)."""
    try:
        return event_from_api(channel, bytes(data))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


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
        raise ApiError(*errors.invalid_channel(channel))


def _check_user(user: str) -> None:
    if not user:
        raise ApiError(400, "'user' must be a non-empty string")
    if len(user.encode()) > MAX_TOKEN_LENGTH:  # a token's `sub` is shorter than the token
        raise ApiError(400, f"'user' is longer than a token ({MAX_TOKEN_LENGTH} bytes)")


def _data_of(data: msgspec.Raw) -> msgspec.Raw:
    if not data:
        raise ApiError(400, "missing 'data'")
    return data
