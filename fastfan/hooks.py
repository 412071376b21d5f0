"""Runs a worker's fastfan.App: the core hands it the requests a hook decides, and it hands
them back once decided (Session.subscribe_allowed, publish_allowed, reply).

Order and isolation: a hook runs at once, in the call; one that finishes without waiting
(a check in memory) costs one coroutine step, no task. One that waits continues in a task
under the timeout, and its connection's later requests wait in that connection's queue
(Session.hooks_pending) until it is done: one connection's messages keep their order,
and other connections go on meanwhile.

Faults stay inside the hook: the client gets an `error` (500 "internal error", 504 for a
timeout, the code of a HookFailure), the connection stays, one log line names the hook
and the cause (with the traceback the first time per hook and cause), and
fastfan_hook_errors_total{hook,cause} counts it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import msgspec

from . import auth, errors
from ._core import Hub, Session, first_step, is_valid_channel
from .api import send
from .app import (
    FAULT_CAUSES,
    HOOK_NAMES,
    App,
    Connection,
    HookError,
    HookFailure,
    Identity,
    Message,
    Publish,
    Refuse,
    Request,
    hook_error_key,
)
from .http_server import HttpError

log = logging.getLogger("fastfan.hooks")

INTERNAL_ERROR = (500, "internal error")
# Requests of one connection that may wait behind its hook before the server stops reading
# from it (and reads on once they are handled): a client cannot grow the queue further.
MAX_WAITING = 64


class BadReturn(Exception):  # noqa: N818 (a fault of the hook's, not an error of ours)
    """A hook answered something its kind of hook cannot answer."""


Finish = Callable[[Any], None]
Fail = Callable[[int, str, dict[str, Any] | None], None]


class _Resume:
    """The rest of a coroutine that already took one step and yielded `future`, awaitable
    by a Task: it waits for the future as the coroutine would have, then lets the
    coroutine go on (Python 3.11 has no eager tasks)."""

    __slots__ = ("coroutine", "future")

    def __init__(self, coroutine: Coroutine[Any, Any, Any], future: Any) -> None:
        self.coroutine = coroutine
        self.future = future

    def __await__(self) -> Generator[Any, None, Any]:
        yield self.future
        return (yield from self.coroutine.__await__())


class Hooks:
    def __init__(self, app: App, hub: Hub, timeout: float) -> None:
        self.app = app
        self.hub = hub
        self.timeout = timeout if app.timeout is None else app.timeout
        self.loop = asyncio.get_running_loop()
        self.errors = dict.fromkeys(
            (hook_error_key(h, c) for h in HOOK_NAMES for c in FAULT_CAUSES), 0)
        self._traced: set[tuple[str, str]] = set()
        hub.hooks = self
        hub.hook_subscribe = app.can_subscribe_hook is not None
        hub.hook_publish = app.can_publish_hook  # called by the core itself (the hot path)
        app.runner = self
        self._message_handlers = [(auth.ChannelPatterns([pattern]), handler)
                                  for pattern, handler in app.message_handlers]
        if self._message_handlers:
            hub.bus.tap_messages([pattern for pattern, _ in app.message_handlers],
                                 self.tapped)

    # Running one hook ---------------------------------------------------------------------

    def run(self, hook: str, call: Callable[[], Awaitable[Any]], finish: Finish,
            fail: Fail, session: Session | None = None) -> None:
        """`finish(result)` once the hook answered, `fail(code, message, shape)` if it
        refused or failed. With a `session`, the connection's later requests wait while
        it runs."""
        try:
            result = first_step(call(), _Resume)
        except BaseException as exc:  # whatever a hook raises is the hook's fault
            self._failed(hook, exc, fail)
            return
        if type(result) is _Resume:
            self._wait(hook, result, finish, fail, session)
        else:
            self._answered(hook, result, finish, fail)

    def _wait(self, hook: str, rest: _Resume, finish: Finish, fail: Fail,
              session: Session | None) -> None:
        """A hook that waits: the rest of it in a task, under the timeout."""
        if session is not None:
            session.hooks_pending = True
        task = self.loop.create_task(_resumed(rest))
        timer = self.loop.call_later(self.timeout, task.cancel, "timeout")
        task.add_done_callback(functools.partial(self._ended, hook, finish, fail, session,
                                                 timer))

    def _ended(self, hook: str, finish: Finish, fail: Fail, session: Session | None,
               timer: asyncio.TimerHandle, task: asyncio.Task[Any]) -> None:
        timer.cancel()
        try:
            result = task.result()
        except asyncio.CancelledError:
            self._fault(hook, "timeout", None, f"took more than {self.timeout:g} s")
            fail(504, f"{hook} timed out", None)
        except BaseException as exc:
            self._failed(hook, exc, fail)
        else:
            self._answered(hook, result, finish, fail)
        if session is not None:
            self._go_on(session)

    def _answered(self, hook: str, result: Any, finish: Finish, fail: Fail) -> None:
        try:
            finish(result)
        except BadReturn as exc:
            self._fault(hook, "bad_return", None, str(exc))
            fail(*INTERNAL_ERROR, None)

    def _failed(self, hook: str, exc: BaseException, fail: Fail) -> None:
        if isinstance(exc, Refuse):
            fail(exc.code if isinstance(exc.code, int) else 403, str(exc.message), None)
        elif isinstance(exc, HookError):
            self._shaped(hook, exc, fail)
        elif isinstance(exc, HookFailure):
            self._fault(hook, exc.cause, None, exc.message)
            fail(exc.code, exc.message, None)
        elif isinstance(exc, Exception):
            self._fault(hook, "exception", exc, f"{type(exc).__name__}: {exc}")
            fail(*INTERNAL_ERROR, None)
        else:
            raise exc

    def _shaped(self, hook: str, error: HookError, fail: Fail) -> None:
        """The `error` of a HookError, shaped by the App's handler for its type."""
        handler = self.app.error_handlers.get(error.type())
        if handler is None:
            fail(error.code, error.message, None)
            return

        def shaped(shape: Any) -> None:
            if not isinstance(shape, dict) or not isinstance(shape.get("code"), int) \
                    or not isinstance(shape.get("message"), str):
                raise BadReturn(f'@app.errors("{error.type()}") must return '
                                f'{{"code": int, "message": str}}, not {shape!r:.100}')
            fail(shape["code"], shape["message"], shape)

        async def call() -> Any:
            shape = handler(error)
            return await shape if asyncio.iscoroutine(shape) else shape

        self.run(hook, call, shaped, fail)

    def _fault(self, hook: str, cause: str, exc: BaseException | None, what: str) -> None:
        self.errors[hook_error_key(hook, cause)] += 1
        first = (hook, cause) not in self._traced
        self._traced.add((hook, cause))
        log.error("hook %s failed (%s): %s", hook, cause, what,
                  exc_info=exc if first and exc is not None else None)

    # A connection's queue --------------------------------------------------------------------

    def later(self, session: Session, request: Any, request_id: bytes) -> None:
        """A request that came while a hook of its connection runs: after it, in order."""
        queue = _queue(session)
        queue.append(functools.partial(session.dispatch, request, request_id))
        if len(queue) == MAX_WAITING:
            session.pause_reading()

    def _go_on(self, session: Session) -> None:
        """The connection's hook is done: what waited behind it, until the next that waits."""
        queue = _queue(session)
        session.hooks_pending = False
        paused = len(queue) >= MAX_WAITING
        while queue and not session.hooks_pending:
            queue.popleft()()
        if paused and len(queue) < MAX_WAITING:
            session.resume_reading()

    # What the core hands over --------------------------------------------------------------

    def connected(self, session: Session) -> None:
        """After `welcome`: the channels authenticate named, then on_connect."""
        connection: Connection = session.connection
        connection.client_id = session.client_id.decode("ascii")
        for channel in connection.pending_channels:
            session.subscribe_allowed(channel, b"", False, None)
        connection.pending_channels = ()
        hook = self.app.on_connect_hook
        if hook is not None:
            self.run("on_connect", lambda: hook(connection), _ignore, _ignore_failure,
                     session)

    def disconnected(self, session: Session) -> None:
        connection: Connection = session.connection
        connection.waiting = None
        hook = self.app.on_disconnect_hook
        if hook is not None:
            code, reason = connection.closed_code_and_reason()
            self.run("on_disconnect", lambda: hook(connection, code, reason), _ignore,
                     _ignore_failure)

    def refresh(self, session: Session) -> None:
        """The connection's expiry passed: the App's refresh gives it a new one, or it
        closes with 4001."""
        hook = self.app.refresh_hook
        assert hook is not None

        def refreshed(expires_at: Any) -> None:
            if expires_at is None:
                session.close(4001, "token expired")
            elif isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool):
                if expires_at <= time.time():
                    session.close(4001, "token expired")
                else:
                    session.renew(float(expires_at))
            else:
                session.close(4001, "token expired")
                raise BadReturn(f"refresh must return seconds since the epoch or None, not "
                                f"{expires_at!r:.100}")

        def failed(code: int, message: str, shape: dict[str, Any] | None) -> None:
            session.close(4001, "token expired")

        self.run("refresh", lambda: hook(session.connection), refreshed, failed)

    def can_subscribe(self, session: Session, channel: str, request_id: bytes,
                      join_leave: bool, recover: Any) -> None:
        hook = self.app.can_subscribe_hook
        assert hook is not None

        def allowed(result: Any) -> None:
            if result is not None and result is not True:
                raise BadReturn(f"can_subscribe must return None, not {result!r:.100}")
            session.subscribe_allowed(channel, request_id, join_leave, recover)

        self.run("can_subscribe", lambda: hook(session.connection, channel), allowed,
                 functools.partial(_refuse, session, request_id), session)

    def can_publish(self, session: Session, request: Any, request_id: bytes, coroutine: Any,
                    outcome: int, result: Any) -> None:
        """What the core (Session._publish_hooked, which calls the hook and takes its
        first step) leaves to us: an answer other than None (`outcome` 0), a hook that
        waits (1: `result` is what it waits for), or a call that gave no coroutine (-1)."""
        fail = functools.partial(_refuse, session, request_id)
        if outcome == -1:
            try:
                result = first_step(coroutine, _Resume)
            except BaseException as exc:  # whatever a hook raises is the hook's fault
                self._failed("can_publish", exc, fail)
                return
        elif outcome == 1:
            result = _Resume(coroutine, result)
        finish = functools.partial(_publish_as_told, session, request, request_id)
        if type(result) is _Resume:
            self._wait("can_publish", result, finish, fail, session)
        else:
            self._answered("can_publish", result, finish, fail)

    def can_publish_failed(self, session: Session, request_id: bytes,
                           exc: BaseException) -> None:
        """can_publish raised at once (the core took its first step)."""
        self._failed("can_publish", exc, functools.partial(_refuse, session, request_id))

    def rpc(self, session: Session, request: Any, request_id: bytes) -> None:
        method = request.method
        handler = self.app.rpc_methods.get(method)
        fallback = self.app.rpc_fallback
        if handler is None and fallback is None:
            session.reply(_error(404, f"unknown method {method!r}", request_id, None))
            return
        try:
            data = msgspec.json.decode(request.data) if request.data else None
        except msgspec.DecodeError:
            session.reply(_error(400, "invalid JSON in 'data'", request_id, None))
            return

        def answered(result: Any) -> None:
            body = _encode(result)
            session.reply(b'{"type":"rpc_result",' +
                          (b'"id":' + request_id + b"," if request_id else b"") +
                          b'"data":' + body + b"}")

        connection = session.connection
        call: Callable[[], Awaitable[Any]]
        if handler is not None:
            call = functools.partial(handler, connection, data)
        else:
            assert fallback is not None
            call = functools.partial(fallback, connection, method, data)
        self.run("rpc", call, answered, functools.partial(_refuse, session, request_id),
                 session)

    def tapped(self, channel: str, payload: bytes) -> None:
        """A message the bus taps for @app.on_message (once per node): each handler whose
        pattern matches its channel sees it."""
        handlers = [handler for patterns, handler in self._message_handlers
                    if patterns.allows(channel)]
        if not handlers:
            return
        try:
            encoded = _decode_message(payload)
            message = Message(channel, msgspec.json.decode(encoded.data), encoded.sender,
                              encoded.timestamp, encoded.offset, encoded.epoch)
        except (msgspec.DecodeError, RecursionError):
            log.warning("on_message: a message on %s is not fastfan's; not handled", channel)
            return
        for handler in handlers:
            self.run("on_message", functools.partial(handler, message), _ignore,
                     _ignore_failure)

    # app.publish ------------------------------------------------------------------------

    async def publish(self, channel: str, data: Any) -> dict[str, Any]:
        """app.publish: as the server API's publish, `"from":"server"`; ValueError for a
        bad channel name or data that is not JSON, ConnectionError when the bus refused."""
        if not is_valid_channel(channel):
            raise ValueError(errors.invalid_channel(channel)[1])
        try:
            payload = msgspec.json.encode(data)
        except (TypeError, msgspec.EncodeError, UnicodeEncodeError) as exc:
            raise ValueError(f"app.publish: the data is not JSON: {exc}") from None
        try:
            (position,) = await send(self.hub, [channel], payload, b"server")
        except HttpError as exc:
            raise ConnectionError(f"app.publish to {channel}: {exc}") from None
        return position

    # Connections --------------------------------------------------------------------------

    def attach(self, session: Session, identity: auth.Identity, chosen: Identity | None,
               request: Request) -> None:
        """A new session's Connection, as hooks see it; `chosen`: what authenticate
        answered, if it did."""
        info = msgspec.json.decode(identity.info) if identity.info else None
        connection = Connection(session, identity.user, "", info, request)
        if chosen is not None:
            connection.pending_channels = tuple(chosen.channels)
        session.connection = connection

    def figures(self) -> dict[str, float]:
        return {key: float(value) for key, value in self.errors.items()}


class _EncodedMessage(msgspec.Struct):
    """A `message` as the bus carries it (Hub.encode_message)."""

    data: msgspec.Raw
    sender: str | None = msgspec.field(name="from", default=None)
    timestamp: int = 0
    offset: int | None = None
    epoch: str | None = None


_decode_message = msgspec.json.Decoder(_EncodedMessage).decode


def _publish_as_told(session: Session, request: Any, request_id: bytes, result: Any) -> None:
    """can_publish's answer, carried out."""
    if result is None or result is True:
        session.publish_allowed(request, request_id, None, True)
    elif isinstance(result, Publish):
        session.publish_allowed(request, request_id,
                                None if result.data is ... else _encode(result.data),
                                bool(result.history))
    else:
        raise BadReturn(f"can_publish must return None or fastfan.Publish, not "
                        f"{result!r:.100}")


async def _resumed(rest: _Resume) -> Any:
    return await rest


def _queue(session: Session) -> deque[Callable[[], None]]:
    connection: Connection = session.connection
    if connection.waiting is None:
        connection.waiting = deque()
    return connection.waiting


def _encode(value: Any) -> bytes:
    try:
        return msgspec.json.encode(value)
    except (TypeError, msgspec.EncodeError, UnicodeEncodeError) as exc:
        raise BadReturn(f"the hook's answer is not JSON: {exc}") from None


def _error(code: int, message: str, request_id: bytes, shape: dict[str, Any] | None) -> bytes:
    """An `error` reply; `shape`: what an @app.errors handler answered (its other fields
    go along)."""
    body = {"type": "error", "code": code, "message": message}
    body.update((key, value) for key, value in (shape or {}).items() if key not in body)
    encoded = msgspec.json.encode(body)
    return encoded[:-1] + b',"id":' + request_id + b"}" if request_id else encoded


def _refuse(session: Session, request_id: bytes, code: int, message: str,
            shape: dict[str, Any] | None) -> None:
    session.reply(_error(code, message, request_id, shape))


def _ignore(result: Any) -> None:
    """A notification's answer is not read."""


def _ignore_failure(code: int, message: str, shape: dict[str, Any] | None) -> None:
    """A notification has nobody to tell (its fault is logged and counted)."""


def identity_of(chosen: Identity, token: auth.Identity | None) -> auth.Identity:
    """What authenticate answered as the core's Identity: what it leaves None comes from
    the token (`info`, `expires_at`, the patterns), if there is one. TypeError or
    ValueError (or AuthError, for `info`) when it does not hold together."""
    if not isinstance(chosen.user, str) or not chosen.user:
        raise ValueError(f"user must be a non-empty string, not {chosen.user!r:.100}")
    for channel in chosen.channels:
        if not isinstance(channel, str) or not is_valid_channel(channel):
            raise ValueError(f"channels: {channel!r:.100} is not a channel name")
    if chosen.info is not None:
        info = auth.info_text(chosen.info, "info")
    else:
        info = "" if token is None else token.info
    return auth.Identity(
        user=chosen.user,
        subscribe=_patterns(chosen.subscribe, "subscribe", token.subscribe if token else None),
        publish=_patterns(chosen.publish, "publish", token.publish if token else None),
        expires_at=chosen.expires_at if chosen.expires_at is not None
        else None if token is None else token.expires_at,
        info=info)


def _patterns(chosen: Any, name: str, token: auth.ChannelPatterns | None
              ) -> auth.ChannelPatterns:
    if chosen is None:
        return auth.ALLOW_ALL if token is None else token
    if isinstance(chosen, str) or not all(isinstance(p, str) for p in chosen):
        raise TypeError(f"{name} must be a list of channel patterns")
    return auth.ChannelPatterns(chosen)
