"""The application's own code: `fastfan run --app package.module:app` with
`app = fastfan.App()`.

Every hook is optional and `async`, and runs in the worker that holds the connection, under
--hook-timeout (`App.timeout` overrides it: the HTTP proxies bring their own). What a hook
may answer, and what the client gets when it fails, is in docs/hooks.md; fastfan.hooks runs
them. A server without an App, or an App without a given hook, pays nothing for it: the
core calls Python for a request only when a hook wants it.

    import fastfan
    app = fastfan.App()

    @app.can_publish
    async def check(connection, channel, data):
        if not isinstance(data, dict) or "text" not in data:
            raise fastfan.ValidationError("a message needs 'text'")
        return fastfan.Publish(data={**data, "user": connection.user})
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import msgspec
from multidict import CIMultiDictProxy

__all__ = [
    "App",
    "Connection",
    "Heartbeat",
    "HookError",
    "HookFailure",
    "Identity",
    "Message",
    "Publish",
    "Refuse",
    "Request",
    "ValidationError",
]


log = logging.getLogger("fastfan.hooks")

# What connection.metadata may hold, as JSON, to show in presence: every presence answer
# carries it, for each client listed (the token's `info` has 1 KiB).
MAX_METADATA_BYTES = 4096


class Refuse(Exception):  # noqa: N818 (a verb: `raise fastfan.Refuse(403, "...")`)
    """A hook's refusal: the client gets `code` and `message` in an `error` (for
    `authenticate`, HTTP `code` before the upgrade: 403 when it is not 400-599)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message or "refused"


class HookError(Exception):
    """A failure a hook names by its class: the client gets an `error` with `code` and
    the message, shaped by `@app.errors(type)` when the App has a handler for its type.

    The type is the class name without `Error`, in snake case: ValidationError is
    "validation", RateLimitError "rate_limit"."""

    code: int = 400

    def __init__(self, message: str = "", code: int | None = None) -> None:
        super().__init__(message)
        self.message = message or self.type()
        if code is not None:
            self.code = code

    @classmethod
    def type(cls) -> str:
        name = cls.__name__.removesuffix("Error") or cls.__name__
        return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class ValidationError(HookError):
    """The message or request does not pass the application's checks (type "validation")."""


class HookFailure(Exception):  # noqa: N818 (not an error of the hook's: a fault)
    """A hook that could not answer, for the hooks that call something else (the HTTP
    proxies): counted in fastfan_hook_errors_total with `cause` (timeout, http_status,
    bad_body, ...); the client gets `code` and `message`, as for any other fault."""

    def __init__(self, cause: str, code: int, message: str) -> None:
        super().__init__(message)
        self.cause = cause
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Identity:
    """What `authenticate` answers: who the connection is.

    `info`: what others see in presence and join/leave (any JSON value of at most 1 KiB;
    None: the token's `info`, if any). `expires_at`: seconds since the epoch (None: the
    token's `exp`, if any); past it the connection is refreshed (`@app.refresh`) or closed
    with 4001. `channels`: subscribed server-side before `welcome`, without asking
    `can_subscribe`. `subscribe`/`publish`: channel patterns (`*` matches any run of
    characters) replacing the token's; None keeps the token's (all, without a token).
    """

    user: str
    info: Any = None
    expires_at: float | None = None
    channels: Iterable[str] = ()
    subscribe: Iterable[str] | None = None
    publish: Iterable[str] | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    """What `can_publish` may answer besides None (allowed as sent): the message `data`
    to publish instead (any JSON value; left out: the client's own), and whether it is
    kept in history (on a channel with history)."""

    data: Any = ...
    history: bool = True


@dataclass(frozen=True, slots=True)
class Request:
    """The upgrade request `authenticate` sees. `path` without the query, `query` a
    mapping of the first value of each name, `headers` case-insensitive, `peer`
    `(host, port)`, `token` the bearer token (header, else `?token=`) or None, `claims`
    the token's claims once verified (with a token key), else None; `client_id` the
    clientId the connection will have (in `welcome`), chosen before the upgrade."""

    path: str
    query: Mapping[str, str]
    headers: CIMultiDictProxy[str]
    peer: tuple[str, int] | None
    token: str | None
    claims: dict[str, Any] | None
    client_id: str = ""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The seed's HeartbeatManager.getStatus: when the client was last heard (ms since the
    epoch), pings sent since without an answer, and whether it is still counted alive."""

    last_seen: int
    unanswered: int
    alive: bool


@dataclass(frozen=True, slots=True)
class Message:
    """A message `@app.on_message` sees: `data` is the parsed JSON value; `from_` the
    publisher's clientId, "api" or "server"; `offset`/`epoch` on a channel with history."""

    channel: str
    data: Any
    from_: str | None
    timestamp: int
    offset: int | None = None
    epoch: str | None = None


class Connection:
    """One client connection, as hooks see it. `metadata` is the application's to change
    at any time: it shows in `presence` as "metadata" beside "info" within a second."""

    __slots__ = ("__weakref__", "_closed_with", "_metadata", "_session", "client_id", "info",
                 "pending_channels", "request", "user", "waiting")

    def __init__(self, session: Any, user: str, client_id: str, info: Any,
                 request: Request | None) -> None:
        self._session = session  # fastfan._core.Session
        self.user = user
        self.client_id = client_id
        self.info = info
        self.request = request  # the upgrade request (the proxies forward its headers)
        self._metadata: _Metadata | None = None  # made when first asked for
        # fastfan.hooks' own: the requests that wait behind a hook of this connection
        # (a deque once one waits: an empty one is 600 bytes), the channels authenticate
        # named (until subscribed), how it closed
        self.waiting: deque[Callable[[], None]] | None = None
        self.pending_channels: tuple[str, ...] = ()
        self._closed_with: tuple[int, str] = (1006, "")

    def closed_with(self, code: int, reason: str | bytes) -> None:
        """The close code and reason on_disconnect gets (the first CLOSE, either side's)."""
        if self._closed_with[0] == 1006:
            if isinstance(reason, bytes):
                reason = reason.decode(errors="replace")
            self._closed_with = (code, reason)

    def closed_code_and_reason(self) -> tuple[int, str]:
        return self._closed_with

    @property
    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            self._metadata = _Metadata(self)
        return self._metadata

    @metadata.setter
    def metadata(self, value: Mapping[str, Any]) -> None:
        self._metadata = _Metadata(self, value)
        self._session.metadata_changed()

    def metadata_text(self) -> str:
        """The metadata as presence carries it: JSON text, "" when empty. Past
        MAX_METADATA_BYTES (or not JSON) it is left out of presence, with a warning."""
        if not self._metadata:
            return ""
        try:
            text = msgspec.json.encode(self._metadata)
        except (TypeError, msgspec.EncodeError, UnicodeEncodeError) as exc:
            log.warning("%r: metadata left out of presence, it is not JSON: %s", self, exc)
            return ""
        if len(text) > MAX_METADATA_BYTES:
            log.warning("%r: metadata left out of presence, %d bytes of JSON (at most %d)",
                        self, len(text), MAX_METADATA_BYTES)
            return ""
        return text.decode()

    @property
    def heartbeat(self) -> Heartbeat:
        last_seen, unanswered, alive = self._session.heartbeat()
        return Heartbeat(last_seen, unanswered, alive)

    @property
    def closed(self) -> bool:
        return bool(self._session.closing)

    async def send(self, data: Any) -> None:
        """A `message` to this connection alone: `"channel":null`, `"from":"server"`."""
        self._session.send_data(msgspec.json.encode(data))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self._session.close(code, reason)

    def __repr__(self) -> str:
        return f"<Connection {self.client_id} user={self.user!r}>"


class _Metadata(dict[str, Any]):
    """A dict that tells its connection when it changes (presence shows it)."""

    __slots__ = ("_connection",)

    def __init__(self, connection: Connection, value: Mapping[str, Any] | None = None) -> None:
        super().__init__(value or {})
        self._connection = connection

    def _changed(self) -> None:
        self._connection._session.metadata_changed()

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._changed()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def pop(self, *args: Any) -> Any:
        value = super().pop(*args)
        self._changed()
        return value

    def setdefault(self, key: str, default: Any = None) -> Any:
        value = super().setdefault(key, default)
        self._changed()
        return value

    def clear(self) -> None:
        super().clear()
        self._changed()


_PATTERN = re.compile(r"[A-Za-z0-9_\-.:@/*]{1,255}")

# fastfan_hook_errors_total{hook,cause}: the hooks, and what went wrong with one.
HOOK_NAMES = ("authenticate", "can_subscribe", "can_publish", "rpc", "refresh", "on_connect",
              "on_disconnect", "on_message")
FAULT_CAUSES = ("exception", "timeout", "bad_return", "http_status", "bad_body")


def hook_error_key(hook: str, cause: str) -> str:
    """The worker's figure of fastfan_hook_errors_total{hook,cause} (fastfan.metrics)."""
    return f"hook_errors_{hook}_{cause}_total"


Hook = TypeVar("Hook", bound=Callable[..., Awaitable[Any]])
ErrorHandler: TypeAlias = Callable[[HookError], Any]


@dataclass
class App:
    """The hooks of one application; see the module's docstring.

    `timeout`: seconds each hook may take (None: --hook-timeout)."""

    timeout: float | None = None
    authenticate_hook: Callable[[Request], Awaitable[Identity | None]] | None = None
    can_subscribe_hook: Callable[[Connection, str], Awaitable[None]] | None = None
    can_publish_hook: Callable[[Connection, str, Any], Awaitable[Publish | None]] | None = None
    refresh_hook: Callable[[Connection], Awaitable[float | None]] | None = None
    on_connect_hook: Callable[[Connection], Awaitable[None]] | None = None
    on_disconnect_hook: Callable[[Connection, int, str], Awaitable[None]] | None = None
    rpc_methods: dict[str, Callable[[Connection, Any], Awaitable[Any]]] = field(
        default_factory=dict)
    # Called for a method rpc_methods lacks (the rpc proxy takes every method): None
    # answers 404.
    rpc_fallback: Callable[[Connection, str, Any], Awaitable[Any]] | None = None
    error_handlers: dict[str, ErrorHandler] = field(default_factory=dict)
    message_handlers: list[tuple[str, Callable[[Message], Awaitable[None]]]] = field(
        default_factory=list)
    # Set by the worker that runs this App (fastfan.hooks.Hooks): app.publish's way out.
    runner: Any = field(default=None, repr=False, compare=False)

    def hooks(self) -> list[str]:
        """The names of the hooks this App has, as `fastfan run` logs them."""
        named = [name for name in ("authenticate", "can_subscribe", "can_publish", "refresh",
                                   "on_connect", "on_disconnect")
                 if getattr(self, f"{name}_hook") is not None]
        named += [f"rpc {method}" for method in self.rpc_methods]
        named += [f"on_message {pattern}" for pattern, _ in self.message_handlers]
        return named

    def authenticate(self, hook: Hook) -> Hook:
        """`(request) -> Identity`, or raise Refuse(status, reason): before the upgrade."""
        self.authenticate_hook = hook
        return hook

    def can_subscribe(self, hook: Hook) -> Hook:
        """`(connection, channel) -> None` to allow, or raise Refuse(code, message)."""
        self.can_subscribe_hook = hook
        return hook

    def can_publish(self, hook: Hook) -> Hook:
        """`(connection, channel, data) -> None | Publish`, or raise Refuse(code, message)."""
        self.can_publish_hook = hook
        return hook

    def refresh(self, hook: Hook) -> Hook:
        """`(connection) -> float | None`: when the connection's expiry passes, its new
        expiry (seconds since the epoch); None or Refuse closes it with 4001."""
        self.refresh_hook = hook
        return hook

    def on_connect(self, hook: Hook) -> Hook:
        """`(connection)`: after `welcome`."""
        self.on_connect_hook = hook
        return hook

    def on_disconnect(self, hook: Hook) -> Hook:
        """`(connection, code, reason)`: once the connection is gone."""
        self.on_disconnect_hook = hook
        return hook

    def rpc(self, method: str) -> Callable[[Hook], Hook]:
        """`(connection, data) -> reply`: answers `{"type":"rpc","method":method,...}`."""
        def register(hook: Hook) -> Hook:
            self.rpc_methods[method] = hook
            return hook
        return register

    def errors(self, kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """`(error) -> {"code", "message"}` (plain or async): the `error` a client gets for
        a HookError of this type ("validation": ValidationError)."""
        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            self.error_handlers[kind] = handler
            return handler
        return register

    def on_message(self, pattern: str) -> Callable[[Hook], Hook]:
        """`(message)`: once per node for every message of a channel matching `pattern`
        (`*` matches any run of characters), whatever published it."""
        if not pattern or not _PATTERN.fullmatch(pattern):
            raise ValueError(f"on_message({pattern!r}): a channel pattern is channel "
                             "characters (A-Z a-z 0-9 _ - . : @ /) and '*'")

        def register(hook: Hook) -> Hook:
            self.message_handlers.append((pattern, hook))
            return hook
        return register

    async def publish(self, channel: str, data: Any) -> dict[str, Any]:
        """Publish to every subscriber of `channel` on every worker and node, `"from":
        "server"`: `{}`, or `{"offset","epoch"}` on a channel with history."""
        if self.runner is None:
            raise RuntimeError("app.publish works in a running server (fastfan run --app)")
        result: dict[str, Any] = await self.runner.publish(channel, data)
        return result


def load_app(spec: str) -> App:
    """The App `package.module:attribute` names; ValueError saying why not, in one line."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError("expected package.module:attribute, e.g. myapp.hooks:app")
    if os.getcwd() not in sys.path:  # as `python -m` would: the application is here
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # whatever the module raises while it loads
        raise ValueError(f"module {module_name} does not import: {type(exc).__name__}: "
                         + " ".join(str(exc).split())) from None
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        found = "nothing" if app is None else f"a {type(app).__name__}"
        raise ValueError(f"{module_name} has {found} named {attribute}, not a fastfan.App")
    return app
