"""The same hooks over HTTP: `--proxy-connect`, `--proxy-refresh`, `--proxy-subscribe`,
`--proxy-publish` and `--proxy-rpc` make an App whose hooks POST JSON to those URLs, with
Centrifugo's proxy request and response shapes, so that a backend written for Centrifugo's
proxies answers fastfan's unchanged (docs/proxies.md).

Both doors open onto one mechanism: fastfan.hooks runs these hooks as it runs Python ones
(order per connection, faults counted in fastfan_hook_errors_total, the client's `error`).
What is the proxies' own: the request bodies, reading the answers, the headers of the
client's upgrade forwarded on every request, one kept-alive aiohttp pool per worker, and
--proxy-timeout for the whole exchange (a backend that sends one byte a second is cut).

    request  {"client","transport":"websocket","protocol":"json","encoding":"json",
              "user","channel","data","method"}   (each where it applies)
    answer   {"result":{...}} | {"error":{"code","message"}} | {"disconnect":{"code","reason"}}
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
from multidict import CIMultiDict

from ._core import is_valid_channel
from .app import App, Connection, HookFailure, Identity, Publish, Refuse, Request, hook_error_key
from .auth import ANONYMOUS, AuthError, info_text

if TYPE_CHECKING:  # aiohttp is imported where used: without proxies a worker never loads it
    import aiohttp

    from .config import Config

log = logging.getLogger("fastfan.proxy")

DEFAULT_HEADERS = "Cookie,Authorization,User-Agent,X-Forwarded-For,X-Real-Ip"
# As Centrifugo: a refresh proxy that cannot answer gives the connection this many seconds
# more, then is asked again (a backend's blip does not close every connection it holds).
REFRESH_RETRY = 60.0
# The largest answer read from a proxy: past it the answer is refused (bad_body), so a
# backend cannot make a worker hold more for one request.
MAX_ANSWER_BYTES = 1 << 20
# Connections of the worker's pool to all proxies together; requests past them wait for one
# within their own --proxy-timeout (aiohttp's default).
POOL_SIZE = 100
# The fields every request carries: fastfan speaks JSON over WebSocket only.
_CONNECTION_FIELDS = {"transport": "websocket", "protocol": "json", "encoding": "json"}


class _Error(msgspec.Struct):
    code: int
    message: str = ""


class _Disconnect(msgspec.Struct):
    code: int
    reason: str = ""


class _ConnectResult(msgspec.Struct):
    user: str
    expire_at: int = 0
    info: Any = msgspec.UNSET
    channels: list[str] = []


class _RefreshResult(msgspec.Struct):
    expired: bool = False
    expire_at: int = 0


class _SubscribeResult(msgspec.Struct):
    pass


class _PublishResult(msgspec.Struct):
    data: Any = msgspec.UNSET
    skip_history: bool = False


class _RpcResult(msgspec.Struct):
    data: Any = None


Result = TypeVar("Result")


class _Answer(msgspec.Struct, Generic[Result]):
    """What a proxy answers; the b64 and other fields of Centrifugo's are left unread."""

    result: Result | None = None
    error: _Error | None = None
    disconnect: _Disconnect | None = None


_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "connect": msgspec.json.Decoder(_Answer[_ConnectResult]),
    "refresh": msgspec.json.Decoder(_Answer[_RefreshResult]),
    "subscribe": msgspec.json.Decoder(_Answer[_SubscribeResult]),
    "publish": msgspec.json.Decoder(_Answer[_PublishResult]),
    "rpc": msgspec.json.Decoder(_Answer[_RpcResult]),
}
# fastfan_hook_errors_total's `hook` label of each proxy: the hook it stands in for.
_HOOK_OF = {"connect": "authenticate", "refresh": "refresh", "subscribe": "can_subscribe",
            "publish": "can_publish", "rpc": "rpc"}


def configured(config: Config) -> bool:
    return any(_urls(config).values())


def describe(config: Config) -> str:
    """The configured proxies, as `fastfan run` logs them: `connect http://…, rpc http://…`."""
    return ", ".join(f"{kind} {url}" for kind, url in _urls(config).items() if url)


def check(config: Config, app: App | None) -> None:
    """ValueError naming the option when a proxy and --app's hook would decide the same."""
    if app is None:
        return
    urls = _urls(config)
    taken = {"connect": app.authenticate_hook, "refresh": app.refresh_hook,
             "subscribe": app.can_subscribe_hook, "publish": app.can_publish_hook,
             "rpc": app.rpc_fallback}
    for kind, url in urls.items():
        if url and taken[kind] is not None:
            raise ValueError(f"--proxy-{kind} and --app's {_HOOK_OF[kind]} would both decide; "
                             "keep one")


def _urls(config: Config) -> dict[str, str | None]:
    return {"connect": config.proxy_connect, "refresh": config.proxy_refresh,
            "subscribe": config.proxy_subscribe, "publish": config.proxy_publish,
            "rpc": config.proxy_rpc}


class Proxies:
    """One worker's proxies: the hooks, and the aiohttp pool they share."""

    def __init__(self, config: Config) -> None:
        self.urls = _urls(config)
        self.timeout = config.proxy_timeout
        self.headers = [name.strip() for name in config.proxy_headers.split(",")
                        if name.strip()]
        self._session: aiohttp.ClientSession | None = None
        self.app: App | None = None

    def install(self, app: App | None) -> App:
        """`app` (the --app's, or a new one) with a hook for each configured proxy."""
        if app is None:
            # The proxies keep their own deadline, --proxy-timeout; the runner's is a
            # backstop a second after it.
            app = App(timeout=self.timeout + 1)
        urls = self.urls
        if urls["connect"]:
            app.authenticate_hook = self.connect
        if urls["refresh"]:
            app.refresh_hook = self.refresh
        if urls["subscribe"]:
            app.can_subscribe_hook = self.subscribe
        if urls["publish"]:
            app.can_publish_hook = self.publish
        if urls["rpc"]:
            app.rpc_fallback = self.rpc
        self.app = app
        return app

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # The hooks ------------------------------------------------------------------------

    async def connect(self, request: Request) -> Identity | None:
        if request.claims is not None:
            return None  # a valid JWT is enough: the token's identity (as Centrifugo)
        # the clientId the connection will have once accepted (in `welcome`)
        answer = await self._ask("connect", {"client": request.client_id}, request.headers)
        result: _ConnectResult = _result(answer, "connect")
        for channel in result.channels:
            if not is_valid_channel(channel):
                raise _bad_body("connect", f"channels: {channel!r:.100} is not a channel name")
        if result.info is not msgspec.UNSET:
            try:
                info_text(result.info, "info")
            except AuthError as exc:
                raise _bad_body("connect", str(exc)) from None
        return Identity(user=result.user or ANONYMOUS.user,
                        info=None if result.info is msgspec.UNSET else result.info,
                        expires_at=float(result.expire_at) if result.expire_at > 0 else None,
                        channels=tuple(result.channels))

    async def refresh(self, connection: Connection) -> float | None:
        try:
            answer = await self._ask("refresh", _about(connection), _headers_of(connection))
        except HookFailure as failure:
            # As Centrifugo: the connection lives on and is asked about again later.
            if self.app is not None and self.app.runner is not None:
                self.app.runner.errors[hook_error_key("refresh", failure.cause)] += 1
            log.error("proxy refresh failed (%s): %s; asked again in %g s", failure.cause,
                      failure.message, REFRESH_RETRY)
            return time.time() + REFRESH_RETRY
        result: _RefreshResult | None = answer.result
        if result is None or result.expired or result.expire_at <= 0:
            return None  # closes with 4001
        return float(result.expire_at)

    async def subscribe(self, connection: Connection, channel: str) -> None:
        answer = await self._ask("subscribe", {**_about(connection), "channel": channel},
                                 _headers_of(connection))
        await _refused(answer, "subscribe", connection)

    async def publish(self, connection: Connection, channel: str, data: Any
                      ) -> Publish | None:
        answer = await self._ask("publish",
                                 {**_about(connection), "channel": channel, "data": data},
                                 _headers_of(connection))
        result: _PublishResult = await _refused(answer, "publish", connection)
        if result.data is msgspec.UNSET and not result.skip_history:
            return None
        return Publish(data=... if result.data is msgspec.UNSET else result.data,
                       history=not result.skip_history)

    async def rpc(self, connection: Connection, method: str, data: Any) -> Any:
        answer = await self._ask("rpc", {**_about(connection), "method": method, "data": data},
                                 _headers_of(connection))
        result: _RpcResult = await _refused(answer, "rpc", connection)
        return result.data

    # One exchange ---------------------------------------------------------------------

    async def _ask(self, kind: str, fields: dict[str, Any],
                   client_headers: Mapping[str, str] | None) -> Any:
        """POST the request to the `kind` proxy; its answer, decoded, or HookFailure."""
        import aiohttp

        url = self.urls[kind]
        assert url is not None
        headers: CIMultiDict[str] = CIMultiDict()
        if client_headers is not None:
            for name in self.headers:
                for value in client_headers.getall(name, ()):  # type: ignore[attr-defined]
                    headers.add(name, value)
        headers["Content-Type"] = "application/json"
        body = msgspec.json.encode({**fields, **_CONNECTION_FIELDS})
        # fastfan.hooks takes a hook's first step outside any task (a hook that answers
        # from memory needs none); asyncio.timeout and aiohttp need one: in it from here on.
        await asyncio.sleep(0)
        try:
            async with asyncio.timeout(self.timeout):
                async with self._pool().post(url, data=body, headers=headers) as response:
                    if not 200 <= response.status < 300:
                        raise HookFailure("http_status", 502,
                                          f"proxy {kind} answered HTTP {response.status}")
                    text = await _read(response, kind)
        except TimeoutError:
            raise HookFailure("timeout", 504, f"proxy {kind} did not answer within "
                                              f"{self.timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise HookFailure("http_status", 502, f"proxy {kind} gave no answer: "
                                                  f"{type(exc).__name__}: {exc}") from None
        try:
            return _DECODERS[kind].decode(text)
        except msgspec.DecodeError as exc:
            raise _bad_body(kind, str(exc)) from None

    def _pool(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=POOL_SIZE),
                timeout=aiohttp.ClientTimeout(total=None))  # ours covers the whole exchange
        return self._session


async def _read(response: aiohttp.ClientResponse, kind: str) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise _bad_body(kind, f"more than {MAX_ANSWER_BYTES} bytes")
    return bytes(body)


def _bad_body(kind: str, why: str) -> HookFailure:
    return HookFailure("bad_body", 502, f"proxy {kind} answered what it may not: {why}")


def _result(answer: Any, kind: str) -> Any:
    """The answer's `result`; Refuse for its `error`, or its `disconnect` (connect: 403)."""
    if answer.error is not None:
        raise Refuse(answer.error.code, answer.error.message or "refused")
    if answer.disconnect is not None:
        raise Refuse(403, answer.disconnect.reason or "disconnected")
    if answer.result is None:
        raise _bad_body(kind, "no result, error or disconnect")
    return answer.result


async def _refused(answer: Any, kind: str, connection: Connection) -> Any:
    """The answer's `result`; Refuse for its `error`; its `disconnect` closes the
    connection with that code."""
    if answer.disconnect is not None:
        code, reason = answer.disconnect.code, answer.disconnect.reason
        if not (code == 1000 or 3000 <= code <= 4999):
            raise _bad_body(kind, f"disconnect code {code} is not a WebSocket close code")
        await connection.close(code, reason.encode()[:123].decode(errors="ignore"))
        raise Refuse(code, reason or "disconnected")
    return _result(answer, kind)


def _about(connection: Connection) -> dict[str, Any]:
    return {"client": connection.client_id, "user": connection.user}


def _headers_of(connection: Connection) -> Mapping[str, str] | None:
    return None if connection.request is None else connection.request.headers
