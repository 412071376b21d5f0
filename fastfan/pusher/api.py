"""Pusher's HTTP API, signed as Pusher signs it, on the client port under `/apps/{ID}/…`
(where the Pusher server libraries look for it: the host and port of the WebSocket
server). fastfan.handshake hands a connection whose first request is for `/apps/` to
fastfan.http_server; this module answers its requests.

    POST /apps/{ID}/events            one event to up to 100 channels; `socket_id` leaves
                                      that connection out
    POST /apps/{ID}/batch_events      up to 10 events, each to its channel
    GET  /apps/{ID}/channels          occupied channels (filter_by_prefix, info=user_count)
    GET  /apps/{ID}/channels/{C}      occupied, subscription_count, user_count
    GET  /apps/{ID}/channels/{C}/users  a presence channel's users
    POST /apps/{ID}/users/{U}/terminate_connections  (also without `/apps/{ID}`, the app
                                      then known by auth_key: the Python library's path)

Counts are every worker's and node's (the bus's gather_channels and gather_presence), as
fastfan's own API counts them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote

import msgspec

from .. import directory
from .._core import BusResult, Hub
from ..bus.base import Acknowledger, Presence
from ..bus.gather import gathered
from ..http_server import HttpServer, Request, Response
from . import Pusher, PusherApp, encode_event, is_channel_name
from .auth import SignatureError, check_request
from .protocol import PRESENCE

log = logging.getLogger("fastfan.pusher")

# Pusher's limits: channels of one event, events of one batch, an event name's length.
MAX_CHANNELS = 100
MAX_BATCH = 10
MAX_EVENT_NAME = 200
# Connections this port's HTTP side holds open at once, per worker (as fastfan's API).
MAX_CONNECTIONS = 128
# Room beyond --max-message-size in a request body: the JSON around the data.
BODY_ENVELOPE = 64 * 1024
# How long an event waits for a bus that takes it later (Redis) before answering 503.
CONFIRM_TIMEOUT = 5.0

_TEXT = b"text/plain; charset=utf-8"


class PusherApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Event(msgspec.Struct, forbid_unknown_fields=False):
    name: str
    data: str
    channels: list[str] | None = None
    channel: str | None = None
    socket_id: str | None = None
    info: str | None = None  # "subscription_count,user_count": the channels' after it


class _Batch(msgspec.Struct, forbid_unknown_fields=False):
    batch: list[_Event]


class _Acknowledgement:
    """Stands in for a Session: a bus that takes a publish later calls acknowledge()."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[bool] = loop.create_future()

    def acknowledge(self, channel: str, request_id: bytes, ok: bool,
                    position: bytes = b"", refusal: str | None = None) -> None:
        if not self.done.done():
            self.done.set_result(ok)


class PusherApi:
    def __init__(self, pusher: Pusher, *, max_message_size: int) -> None:
        self.pusher = pusher
        self.max_message_size = max_message_size
        self.http = HttpServer(self.handle, max_body=max_message_size + BODY_ENVELOPE,
                               body_limit=f"--max-message-size plus {BODY_ENVELOPE}",
                               max_connections=MAX_CONNECTIONS)

    @property
    def hub(self) -> Hub:
        return self.pusher.hub

    async def handle(self, request: Request) -> Response:
        try:
            return Response(200, msgspec.json.encode(await self._route(request)))
        except PusherApiError as exc:
            return Response(exc.status, str(exc).encode() + b"\n", _TEXT)
        except Exception:
            log.exception("Pusher API request %s failed", request.method.decode())
            return Response(500, b"internal error; the server's log says more\n", _TEXT)

    async def _handed(self, publish: Callable[[Acknowledger], int]) -> None:
        """`publish(ack)` (a BusResult) done: 503 if the bus refuses it, or has not taken it
        (Redis, a cache channel's history owner) within CONFIRM_TIMEOUT."""
        acknowledgement = _Acknowledgement(asyncio.get_running_loop())
        outcome = publish(acknowledgement)
        if outcome == BusResult.PENDING:
            try:
                ok = await asyncio.wait_for(acknowledgement.done, CONFIRM_TIMEOUT)
            except TimeoutError:
                ok = False
        else:
            ok = outcome == BusResult.DONE
        if not ok:
            raise PusherApiError(503, "message bus unavailable, try again")

    async def _route(self, request: Request) -> dict[str, Any]:
        raw_path, _, query = request.url.partition(b"?")
        path = raw_path.decode("latin-1")
        params = {key.lower(): value for key, value in
                  parse_qsl(query.decode("latin-1"), keep_blank_values=True)}
        parts = path.split("/")  # "", "apps", ID, ... or "", "users", U, ...
        if parts[1] == "users":
            app = next((app for app in self.pusher.apps_by_id.values()
                        if app.key == params.get("auth_key")), None)
            resource = parts[1:]
        else:
            app = self.pusher.apps_by_id.get(parts[2]) if len(parts) > 3 else None
            resource = parts[3:]
        if app is None:
            raise PusherApiError(404, f"no such app or path: {path}")
        method = request.method.decode()
        try:
            check_request(app, method, path, params, bytes(request.body), time.time())
        except SignatureError as exc:
            raise PusherApiError(401, str(exc)) from None
        if method == "POST" and resource == ["events"]:
            event = _decode(request.body, _Event)
            await self._events(app, [event])
            if event.info is None:
                return {}
            return {"channels": {channel: await self._info_of(app, channel, event.info)
                                 for channel in event.channels or ()}}
        if method == "POST" and resource == ["batch_events"]:
            batch = _decode(request.body, _Batch).batch
            if len(batch) > MAX_BATCH:
                raise PusherApiError(400, f"at most {MAX_BATCH} events in a batch")
            await self._events(app, batch)
            if all(event.info is None for event in batch):
                return {}
            return {"batch": [{} if event.info is None else await self._info_of(
                app, (event.channels or [""])[0], event.info) for event in batch]}
        if method == "GET" and resource == ["channels"]:
            return await self._channels(app, params)
        if method == "GET" and len(resource) in (2, 3) and resource[0] == "channels":
            channel = unquote(resource[1])
            _check_channel(channel)
            if len(resource) == 2:
                return await self._channel(app, channel, params)
            if resource[2] == "users":
                return await self._users(app, channel)
        if method == "POST" and len(resource) == 3 and resource[0] == "users" \
                and resource[2] == "terminate_connections" and resource[1]:
            user = unquote(resource[1])
            await self._handed(lambda ack: self.pusher.terminate(app, user, ack))
            return {}
        raise PusherApiError(404, f"no such path: {method} {path}")

    # Events -------------------------------------------------------------------------------

    async def _events(self, app: PusherApp, events: list[_Event]) -> None:
        """Checked first, then published: a bad event publishes none of the request's.
        Answered once the bus has each (a cache channel's keeps it in order with the
        next request's)."""
        for event in events:
            channels = event.channels if event.channels is not None else (
                [event.channel] if event.channel is not None else [])
            if not channels or len(channels) > MAX_CHANNELS:
                raise PusherApiError(400, f"an event goes to 1 to {MAX_CHANNELS} channels")
            for channel in channels:
                _check_channel(channel)
            if not event.name or len(event.name) > MAX_EVENT_NAME:
                raise PusherApiError(400, f"event name of 1 to {MAX_EVENT_NAME} characters")
            if len(event.data) > self.max_message_size:
                raise PusherApiError(413, f"event data over {self.max_message_size} bytes "
                                          "(--max-message-size)")
            if "user_count" in _info({"info": event.info or ""}) and not all(
                    channel.startswith(PRESENCE) for channel in channels):
                raise PusherApiError(400, "info=user_count is only for presence channels")
            event.channels = channels
        for event in events:
            for channel in event.channels or ():
                frame = encode_event(event.name, channel, event.data)
                await self._handed(functools.partial(
                    self.pusher.publish_for_api, app, channel, frame, event.socket_id))

    async def _info_of(self, app: PusherApp, channel: str, info: str) -> dict[str, int]:
        """An event's `info` attributes of one of its channels, once it is published."""
        answer = await self._channel(app, channel, {"info": info})
        answer.pop("occupied")
        return answer

    # Queries ------------------------------------------------------------------------------

    async def _channels(self, app: PusherApp, params: dict[str, str]) -> dict[str, Any]:
        prefix = params.get("filter_by_prefix", "")
        info = _info(params)
        if "user_count" in info and not prefix.startswith(PRESENCE):
            raise PusherApiError(400, "info=user_count needs filter_by_prefix=presence-")
        counts = await self._counts(app.bus_channel(prefix) + "*")
        start = len(app.bus_channel(""))
        channels: dict[str, dict[str, int]] = {}
        for name, count in counts.items():
            if name[start:].startswith("#"):
                continue  # a signed-in user's own channel is not the app's
            entry = channels[name[start:]] = {}
            if "subscription_count" in info:
                entry["subscription_count"] = count
            if "user_count" in info:
                entry["user_count"] = len((await self._presence(name))[1])
        return {"channels": channels}

    async def _channel(self, app: PusherApp, channel: str,
                       params: dict[str, str]) -> dict[str, Any]:
        info = _info(params)
        if "user_count" in info and not channel.startswith(PRESENCE):
            raise PusherApiError(400, "user_count is only for presence channels")
        count = (await self._counts(app.bus_channel(channel))).get(app.bus_channel(channel), 0)
        answer: dict[str, Any] = {"occupied": count > 0}
        if "subscription_count" in info:
            answer["subscription_count"] = count
        if "user_count" in info:
            answer["user_count"] = len((await self._presence(app.bus_channel(channel)))[1])
        return answer

    async def _users(self, app: PusherApp, channel: str) -> dict[str, Any]:
        if not channel.startswith(PRESENCE):
            raise PusherApiError(400, "users are only for presence channels")
        clients = (await self._presence(app.bus_channel(channel)))[2]
        users = list(dict.fromkeys(user for _, user, _ in clients))
        return {"users": [{"id": user} for user in users]}

    async def _counts(self, pattern: str) -> dict[str, int]:
        hub = self.hub
        limit = directory.MAX_LISTED
        local = directory.channel_counts(hub.subscriber_counts(), pattern, limit)
        parts: directory.Counts | None = await gathered(
            lambda answer: hub.bus.gather_channels(pattern, limit, local, answer))
        if parts is None:
            raise PusherApiError(503, "a worker or node did not answer, try again")
        return directory.add_up(parts)

    async def _presence(self, channel: str) -> Presence:
        presence: Presence | None = await gathered(
            lambda answer: self.hub.gather_presence(channel, answer))
        if presence is None:
            raise PusherApiError(503, "a worker or node did not answer, try again")
        return presence


def _check_channel(channel: str) -> None:
    if not is_channel_name(channel):
        raise PusherApiError(400, f"invalid channel name {channel[:200]!r}")


def _info(params: dict[str, str]) -> set[str]:
    return {item for item in params.get("info", "").split(",") if item}


def _decode(body: bytearray, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise PusherApiError(400, f"bad request body: {exc}") from None
