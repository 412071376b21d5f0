"""fastfan's client for Python asyncio programs, on picows and msgspec.

```python
async with fastfan.client.Client("ws://host:8080/", token=token) as client:
    sub = await client.subscribe("chat.lobby", recover=True)
    await client.publish("chat.lobby", {"text": "hi"})
    async for message in sub:          # dicts, as the server sent them
        ...
```

The client reconnects by itself (exponential backoff, full jitter), subscribes again to
everything it held (recovering history channels from the last offset it saw), and
refreshes its token before it expires when it was given `get_token`. A request is matched
to its reply by `id`; an error reply raises `ServerError`. What the server would refuse
(a bad channel name, a message over the size limit) raises ValueError before it is sent.

The per-message path is one decode, one dict lookup and a callback or a queue append:
everything else (requests, events, reconnects) is off it. docs/clients.md is the guide.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

import msgspec

from ._picows import (
    WSCloseCode,
    WSFrame,
    WSInvalidStatusError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

__all__ = ["Client", "ConnectionRefused", "ServerError", "Subscription", "backoff_delay"]

log = logging.getLogger("fastfan.client")

# The server's rules (docs/protocol.md, "Channel names" and --max-message-size), checked
# here so a mistake is a ValueError at the call, not an error reply later.
CHANNEL_NAME = re.compile(r"[A-Za-z0-9_\-.:@/]{1,255}")
MAX_MESSAGE_SIZE = 65536
# The error code of a server whose bus or history store is not there for the moment.
UNAVAILABLE = 503

Message = dict[str, Any]
Handler = Callable[..., None]

_TEXT, _CONTINUATION, _CLOSE = WSMsgType.TEXT, WSMsgType.CONTINUATION, WSMsgType.CLOSE
_decode = msgspec.json.decode
_encode = msgspec.json.encode


class ServerError(Exception):
    """The server answered a request with `{"type":"error","code":N,"message":TEXT}`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


class ConnectionRefused(ConnectionError):  # noqa: N818 - the contract's name
    """The server refused the WebSocket upgrade: `.status` (401, 403, 429, 503...) and
    `.reason`, the server's own words (`token expired`, `token is malformed`...)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


# Refusals that the same token cannot get past: without `get_token`, reconnecting stops.
REFUSED_FOR_GOOD = (401, 403)


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 30.0,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0 first): full jitter, a uniform
    draw from [0, min(cap, base * 2**attempt)], so clients cut off together come back
    spread out instead of in one wave."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 64))  # 2**64 * base is past any cap
    return (rng or random).uniform(0.0, ceiling)


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, read without verifying it (the server verifies; the
    client only needs to know when to refresh), or None when it has none."""
    try:
        payload = token.split(".")[1]
        claims = _decode(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, msgspec.DecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def check_channel(channel: str) -> None:
    if not isinstance(channel, str) or CHANNEL_NAME.fullmatch(channel) is None:
        raise ValueError(f"invalid channel name {channel!r}: use 1-255 characters from "
                         "A-Z a-z 0-9 _ - . : @ /")


class _Events:
    """Named callbacks: `on(event, callback)`; a callback that raises is logged, not fatal."""

    EVENTS: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {event: [] for event in self.EVENTS}

    def on(self, event: str, callback: Handler) -> None:
        """Call `callback` on `event` (see the class's docstring for the events)."""
        if event not in self._handlers:
            raise ValueError(f"unknown event {event!r}: one of {', '.join(sorted(self.EVENTS))}")
        self._handlers[event].append(callback)

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self._handlers[event]:
            try:
                callback(*args)
            except Exception:
                log.exception("fastfan.client: a %r callback raised", event)


class Subscription(_Events):
    """One channel the client holds, across reconnects, until `unsubscribe()`.

    Messages go to the `message` callbacks when there are any, else into a queue that
    `async for message in sub` reads (the iteration ends when the subscription does).
    Events: `message` (the message dict), `join` and `leave` (the server's dict),
    `subscribed` (each `subscribed` reply, the first and those after reconnects),
    `recovery_failed` (a `subscribed` reply with `"recovered": false` after a reconnect:
    messages were missed and the application must re-sync from its own source), and
    `unsubscribed` (the server ended it: the reply, with its `reason`).
    """

    EVENTS = frozenset({"message", "join", "leave", "subscribed", "recovery_failed",
                        "unsubscribed"})

    def __init__(self, client: Client, channel: str, recover: bool, join_leave: bool) -> None:
        super().__init__()
        self.client = client
        self.channel = channel
        self.recover = recover
        self.join_leave = join_leave
        self.offset: int | None = None  # the last seen, on channels with history
        self.epoch: str | None = None
        self.confirmed = False  # the server has answered `subscribed` at least once
        self.ended = False
        self._on_message = self._handlers["message"]  # the same list, read per message
        self._queue: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def _deliver(self, message: Message) -> None:
        """The per-message path."""
        if "offset" in message:
            self.offset, self.epoch = message["offset"], message.get("epoch")
        if self._on_message:
            self._emit("message", message)
            return
        self._queue.append(message)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _request(self) -> Message:
        request: Message = {"type": "subscribe", "channel": self.channel}
        if self.join_leave:
            request["joinLeave"] = True
        if self.recover and self.epoch is not None and self.offset is not None:
            request["recover"] = {"offset": self.offset, "epoch": self.epoch}
        return request

    def _subscribed(self, reply: Message) -> None:
        if "epoch" in reply and "offset" in reply and (
                self.epoch != reply["epoch"] or reply.get("recovered") is not True):
            self.offset, self.epoch = reply["offset"], reply["epoch"]  # live from here
        again = self.confirmed
        self.confirmed = True
        self._emit("subscribed", reply)
        if again and reply.get("recovered") is False:
            self._emit("recovery_failed", reply)

    def _end(self) -> None:
        self.ended = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None

    async def unsubscribe(self) -> None:
        """Stop receiving the channel; the iteration ends once the queue is read."""
        if self.ended:
            return
        self.client._forget(self)
        if self.client.connected:
            with contextlib.suppress(ConnectionError):  # gone with the connection anyway
                await self.client._request({"type": "unsubscribe", "channel": self.channel})

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        queue = self._queue
        while not queue:
            if self.ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return queue.popleft()


class _Listener(WSListener):
    """picows's callbacks for one connection: text frames decoded and dispatched."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.subscriptions = client._subscriptions
        self.welcome: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.close_code = WSCloseCode.ABNORMAL_CLOSURE.value
        self.fragments: list[bytes] = []

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is _TEXT and frame.fin:
            self.dispatch(_decode(frame.get_payload_as_memoryview()))
        elif frame.msg_type is _TEXT or frame.msg_type is _CONTINUATION:
            self.fragments.append(frame.get_payload_as_bytes())  # fastfan never fragments
            if frame.fin:
                payload, self.fragments = b"".join(self.fragments), []
                self.dispatch(_decode(payload))
        elif frame.msg_type is _CLOSE:
            close = frame.get_payload_as_bytes()  # the code read raw: 4001 is no WSCloseCode
            self.close_code = int.from_bytes(close[:2], "big") if len(close) >= 2 else 1005
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode.OK)
            transport.disconnect()

    def dispatch(self, message: Message) -> None:
        """The per-message path: a `message` straight to its subscription."""
        if message.get("type") == "message":
            subscription = self.subscriptions.get(message["channel"])
            if subscription is not None:
                subscription._deliver(message)
        else:
            self.client._on_reply(self, message)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("the server closed before its welcome"))
        self.client._on_disconnected(self)


class Client(_Events):
    """A connection to a fastfan server that outlives its TCP connections.

    `token` (sent as `Authorization: Bearer`) or `get_token`, an async function called for
    each connection and before the current token expires; `ssl`, an SSLContext for
    `wss://` (e.g. one that trusts a self-signed certificate); `headers`, more headers of
    each upgrade request (a session `Cookie` for a connect proxy, say). Events: `connected` (the
    `welcome` dict), `disconnected` (the close code; 1006 when the connection just went),
    `error` (a ServerError the server sent unasked, a failed token refresh, or the
    ConnectionRefused that ended reconnecting: a static token the server refuses).
    """

    EVENTS = frozenset({"connected", "disconnected", "error"})

    def __init__(self, url: str, *, token: str | None = None,
                 get_token: Callable[[], Awaitable[str]] | None = None,
                 reconnect_base: float = 0.5, reconnect_cap: float = 30.0,
                 max_message_size: int = MAX_MESSAGE_SIZE, request_timeout: float = 10.0,
                 refresh_margin: float = 10.0, ping_interval: float | None = 15.0,
                 rng: random.Random | None = None, ssl: ssl.SSLContext | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__()
        if token is not None and get_token is not None:
            raise ValueError("give token or get_token, not both")
        self.url = url
        self.token = token
        self.get_token = get_token
        self.reconnect_base = reconnect_base
        self.reconnect_cap = reconnect_cap
        self.max_message_size = max_message_size
        self.request_timeout = request_timeout
        self.refresh_margin = refresh_margin
        self.ping_interval = ping_interval
        self.rng = rng or random.Random()
        self.ssl = ssl
        self.headers = dict(headers or {})
        self.welcome: Message | None = None
        self._subscriptions: dict[str, Subscription] = {}
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._next_id = 0
        self._transport: WSTransport | None = None
        self._listener: _Listener | None = None
        self._connected = asyncio.Event()
        self._lost: asyncio.Future[None] | None = None
        self._closing = False
        self._refused: ConnectionRefused | None = None  # reconnecting ended for good
        self._supervisor: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._transport is not None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the first connection (its failure raises); later ones open by themselves."""
        await self._open()
        self._supervisor = asyncio.get_running_loop().create_task(self._reconnect_forever())

    async def close(self) -> None:
        """Close the connection, end every subscription, and stop reconnecting."""
        self._closing = True
        for task in (self._supervisor, self._refresher):
            if task is not None:
                task.cancel()
        transport, listener = self._transport, self._listener
        if transport is not None and listener is not None:
            listener.close_code = WSCloseCode.OK.value  # ours, not the server's answer
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            await transport.wait_disconnected()
        for subscription in list(self._subscriptions.values()):
            self._forget(subscription)
        self._connected.set()  # requests waiting for a connection: there will be none

    async def subscribe(self, channel: str, *, recover: bool = False,
                        join_leave: bool = False) -> Subscription:
        """Hold `channel` until `unsubscribe()`, across reconnects; answered once the server
        confirms it (`subscribed` is a promise: every later message reaches it).

        `recover`: after a reconnect, ask a history channel for what was missed since the
        last message seen. `join_leave`: also receive `join` and `leave` events.
        """
        check_channel(channel)
        if channel in self._subscriptions:
            raise ValueError(f"already subscribed to {channel!r}: use that Subscription")
        subscription = Subscription(self, channel, recover, join_leave)
        self._subscriptions[channel] = subscription  # before the reply: no message missed
        try:
            reply = await self._request(subscription._request())
        except BaseException:
            self._forget(subscription)
            raise
        subscription._subscribed(reply)
        return subscription

    async def publish(self, channel: str, data: Any, *, echo: bool = True) -> Message:
        """Publish `data` (any JSON value); the `published` reply once the bus has it.
        `echo=False`: this connection does not receive its own message."""
        check_channel(channel)
        request: Message = {"type": "publish", "channel": channel, "data": data}
        if not echo:
            request["echo"] = False
        return await self._request(request)

    async def stats(self) -> Message:
        """This connection's figures: the `stats` reply."""
        return await self._request({"type": "stats"})

    async def presence(self, channel: str) -> Message:
        """Who is subscribed to `channel`: the `presence` reply."""
        check_channel(channel)
        return await self._request({"type": "presence", "channel": channel})

    async def presence_stats(self, channel: str) -> Message:
        check_channel(channel)
        return await self._request({"type": "presence_stats", "channel": channel})

    async def history(self, channel: str, *, limit: int | None = None, since: int | None = None,
                      epoch: str | None = None) -> Message:
        """Kept messages of a history channel: the `history` reply (oldest first)."""
        check_channel(channel)
        request: Message = {"type": "history", "channel": channel}
        for name, value in (("limit", limit), ("since", since), ("epoch", epoch)):
            if value is not None:
                request[name] = value
        return await self._request(request)

    async def rpc(self, method: str, data: Any = None) -> Any:
        """Call the server application's `method` (an `@app.rpc` of --app, or the rpc
        proxy) with `data` (any JSON value): its answer, the `rpc_result`'s `data`, or
        ServerError (404 for a method nobody answers)."""
        if not isinstance(method, str) or not method:
            raise ValueError("rpc needs a method name")
        reply = await self._request({"type": "rpc", "method": method, "data": data})
        return reply.get("data")

    async def _request(self, request: Message) -> Message:
        """Send `request` with a fresh `id` once connected; its reply, or ServerError."""
        if self._refused is not None:
            raise self._refused
        if self._closing:
            raise ConnectionError("the client is closed")
        if self._supervisor is None:
            raise RuntimeError("the client is not connected: call `await client.connect()` "
                               "(or use `async with client:`) first")
        self._next_id += 1
        request_id = request["id"] = self._next_id
        payload = _encode(request)
        if len(payload) > self.max_message_size:
            raise ValueError(f"{request['type']} of {len(payload)} bytes is over the "
                             f"{self.max_message_size}-byte limit (max_message_size)")
        async with asyncio.timeout(self.request_timeout):
            await self._connected.wait()
            if self._transport is None:
                raise self._refused or ConnectionError("the client is closed")
            future = self._send(request_id, payload)
            try:
                return await future
            finally:
                self._pending.pop(request_id, None)

    def _send(self, request_id: int, payload: bytes) -> asyncio.Future[Message]:
        assert self._transport is not None  # connected
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._transport.send(_TEXT, payload)
        return future

    def _on_reply(self, listener: _Listener, message: Message) -> None:
        """Everything but `message`: replies by `id`, the welcome, unasked messages."""
        kind = message.get("type")
        if not listener.welcome.done():
            if kind == "welcome":
                listener.welcome.set_result(message)
            return
        future = self._pending.pop(message["id"], None) if "id" in message else None
        if future is not None:
            if future.done():
                return
            if kind == "error":
                future.set_exception(ServerError(message["code"], message["message"]))
            else:
                future.set_result(message)
        elif kind == "error":
            self._emit("error", ServerError(message.get("code", 0), message.get("message", "")))
        elif kind in ("join", "leave", "unsubscribed"):
            subscription = self._subscriptions.get(message.get("channel", ""))
            if subscription is not None:
                if kind == "unsubscribed":  # unasked: the server ended it
                    self._forget(subscription)
                subscription._emit(kind, message)

    def _forget(self, subscription: Subscription) -> None:
        if self._subscriptions.get(subscription.channel) is subscription:
            del self._subscriptions[subscription.channel]
        subscription._end()

    async def _open(self) -> None:
        """One connection: handshake, welcome, every held subscription asked for again."""
        token = await self.get_token() if self.get_token is not None else self.token
        headers = {**self.headers, **({"Authorization": f"Bearer {token}"} if token else {})}
        try:
            transport, listener = await ws_connect(
                lambda: _Listener(self), self.url, extra_headers=headers,
                ssl_context=self.ssl, enable_auto_ping=self.ping_interval is not None,
                auto_ping_idle_timeout=self.ping_interval or 10.0,
                max_frame_size=max(2 * self.max_message_size, 16 << 20))
        except WSInvalidStatusError as error:
            raise _refusal(error) from None
        assert isinstance(listener, _Listener)
        try:
            async with asyncio.timeout(self.request_timeout):
                welcome = await listener.welcome
        except BaseException:
            transport.disconnect()
            raise
        self.token = token
        self.welcome = welcome
        self._transport, self._listener = transport, listener
        self._lost = asyncio.get_running_loop().create_future()
        self._connected.set()
        for subscription in list(self._subscriptions.values()):
            if subscription.confirmed:
                self._resubscribe(subscription)
        if self.get_token is not None and token:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh(token))
        self._emit("connected", welcome)

    def _resubscribe(self, subscription: Subscription, attempt: int = 0) -> None:
        self._next_id += 1
        request = subscription._request()
        request["id"] = self._next_id
        future = self._send(self._next_id, _encode(request))
        listener = self._listener

        def answered(future: asyncio.Future[Message]) -> None:
            if future.cancelled() or subscription.ended:
                return
            error = future.exception()
            if error is None:
                subscription._subscribed(future.result())
            elif isinstance(error, ServerError) and error.code == UNAVAILABLE:
                # The server is back but not its bus or history store yet (it has just
                # started, or Redis is away): ask again, backing off as reconnects do. A
                # new connection meanwhile asks anyway.
                asyncio.get_running_loop().call_later(
                    backoff_delay(attempt, self.reconnect_base, self.reconnect_cap, self.rng),
                    self._resubscribe_on, listener, subscription, attempt + 1)
            elif isinstance(error, ServerError):  # e.g. no longer permitted: it ends
                self._forget(subscription)
                subscription._emit("unsubscribed", {"type": "unsubscribed",
                                                    "channel": subscription.channel,
                                                    "reason": "error", "error": error})
        future.add_done_callback(answered)

    def _resubscribe_on(self, listener: _Listener | None, subscription: Subscription,
                        attempt: int) -> None:
        """_resubscribe() again, if still on the connection that was refused."""
        if not subscription.ended and listener is not None and self._listener is listener:
            self._resubscribe(subscription, attempt)

    def _on_disconnected(self, listener: _Listener) -> None:
        if listener is not self._listener:
            return  # a connection given up during its handshake
        self._transport = self._listener = None
        self._connected.clear()
        if self._refresher is not None:
            self._refresher.cancel()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the connection to the server was lost"))
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        self._emit("disconnected", listener.close_code)

    async def _reconnect_forever(self) -> None:
        while not self._closing:
            if self._lost is not None:
                await self._lost
            attempt = 0
            while not self._closing:
                await asyncio.sleep(backoff_delay(attempt, self.reconnect_base,
                                                  self.reconnect_cap, self.rng))
                try:
                    await self._open()
                    break
                except ConnectionRefused as error:
                    if error.status in REFUSED_FOR_GOOD and self.get_token is None:
                        self._give_up(error)
                        return
                    self._reconnect_failed(attempt, error)
                except Exception as error:  # unreachable, timed out: try again
                    self._reconnect_failed(attempt, error)
                attempt += 1

    def _reconnect_failed(self, attempt: int, error: Exception) -> None:
        """One warning for the first failure of an outage, the others at INFO."""
        log.log(logging.WARNING if attempt == 0 else logging.INFO,
                "fastfan.client: reconnect attempt %d failed: %s: %s", attempt,
                type(error).__name__, error or "no answer in time")

    def _give_up(self, refusal: ConnectionRefused) -> None:
        """The server refuses this client's only token: say so, to the application's
        `error` callbacks and to every call waiting for a connection, and stop."""
        log.error("fastfan.client: the server refused the token (%s); not reconnecting: "
                  "give the client `get_token` to get new ones", refusal)
        self._refused = refusal
        self._emit("error", refusal)
        self._connected.set()  # the requests waiting for a connection raise it

    async def _refresh(self, token: str) -> None:
        """Before `exp`, a new token from get_token through a `refresh` request."""
        assert self.get_token is not None
        while (expiry := token_expiry(token)) is not None:
            left = expiry - time.time()
            await asyncio.sleep(max(0.0, left - min(self.refresh_margin, left / 2)))
            try:
                token = await self.get_token()
                await self._request({"type": "refresh", "token": token})
            except (ServerError, TimeoutError, ConnectionError) as error:
                self._emit("error", error)  # at exp the server closes; reconnecting fetches
                return
            self.token = token


def _refusal(error: WSInvalidStatusError) -> ConnectionRefused:
    """The server's status and its words: fastfan's body is `401 Unauthorized: <reason>`."""
    status = int(error.response.status) if error.response is not None else 0
    body = (error.raw_body or b"").decode("utf-8", "replace").strip()
    if body.startswith(f"{status} ") and ": " in body:
        body = body.partition(": ")[2]
    return ConnectionRefused(status, body or str(error))
