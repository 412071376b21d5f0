"""The picows listener factory: plain GETs (/health, /ready, /metrics, /fastfan.js), auth →
Session; and FirstRequest, which answers HEAD before picows sees it, and hands the Pusher
HTTP API's requests (`/apps/…`, with --pusher-app) to fastfan.http_server.

picows calls the factory once per HTTP request, synchronously, before it validates the
upgrade headers. It returns a Session (101), a response without listener (health, metrics,
401, 426, 503), or None (404).

The factory also makes picows's protocol for each connection the port accepts
(`ListenerFactory.accept`), to count it from the accept, not from the upgrade: a
connection in its TLS handshake or before its upgrade request holds a file descriptor
too, and counts against --max-connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from http import HTTPStatus
from importlib import resources
from typing import Any, TypeAlias
from urllib.parse import parse_qs

from multidict import CIMultiDict, CIMultiDictProxy

from ._core import Hub, Session
from ._picows import (
    WSAutoPingStrategy,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from ._picows.picows import WSProtocol  # type: ignore[attr-defined]
from .app import Identity as HookIdentity
from .app import Request as HookRequest
from .auth import ANONYMOUS, AuthError, Identity, token_verifier
from .config import Config
from .hooks import BadReturn, Hooks, identity_of
from .http_server import HttpConnection
from .pusher.api import PusherApi
from .pusher.protocol import PusherConnection

log = logging.getLogger("fastfan.handshake")

# How long past the TLS handshake timeout a connection's connection_made may come (the TLS
# layer calls it soon after the handshake ends): without it by then, it never comes.
UNANNOUNCED_END_MARGIN = 1.0

Route: TypeAlias = Session | WSUpgradeResponseWithListener | None

_TEXT = {"Content-Type": "text/plain; charset=utf-8"}
_PROMETHEUS = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
# The browser client, read once. A public static script: any page may import it, from any
# origin (a module is fetched with CORS).
_BROWSER_CLIENT = resources.files(__package__).joinpath("fastfan.js").read_bytes()
_JAVASCRIPT = {"Content-Type": "text/javascript; charset=utf-8",
               "Access-Control-Allow-Origin": "*"}


def _response(status: int, body: bytes, headers: dict[str, str] | None = None) -> Route:
    headers = {**_TEXT, **(headers or {})}
    if status == 200:
        response = WSUpgradeResponse.create_ok_response(body, headers)
    else:
        response = WSUpgradeResponse.create_error_response(status, body, headers)
    return WSUpgradeResponseWithListener(response, None)


class ListenerFactory:
    def __init__(self, config: Config, hub: Hub, *, why_not_ready: Callable[[], list[str]],
                 metrics: Callable[[], bytes], max_connections: int, logger: Any,
                 handshake_timeout: float, read_buffer_init_size: int,
                 pusher_api: PusherApi | None = None) -> None:
        self._config = config
        self.pusher_api = pusher_api  # --pusher-app: /app/KEY and the HTTP API on /apps/
        self._hub = hub
        self._max_connections = max_connections
        # WSProtocol's arguments, as picows 2.3.1's ws_create_server passes them (the
        # version is pinned): no auto-ping, no auto-pong (Session answers pings itself: RSV
        # checks, ordering), close on a listener's exception.
        self._protocol_arguments = (
            None, None, False, self, logger, True, handshake_timeout, False, 20.0, 20.0,
            WSAutoPingStrategy.PING_WHEN_IDLE, False, config.max_message_size, None,
            read_buffer_init_size)
        self._handshake_timeout = handshake_timeout
        self.open_connections = 0  # accepted and not yet gone (accept)
        factory = self

        class CountedProtocol(WSProtocol):  # type: ignore[misc]
            # No attributes: a connection costs what picows's protocol costs.
            __slots__ = ()

            def connection_lost(self, exc: Exception | None) -> None:
                factory.open_connections -= 1
                super().connection_lost(exc)

        self._protocol = CountedProtocol
        self._why_not_ready = why_not_ready
        self._metrics = metrics
        self._socket_paths = {b"/", b"/ws"}
        self._echo_path = config.echo_path.encode() if config.echo_path else None
        self.auth_failures_total = 0
        # token -> Identity, or AuthError; None under --insecure. Sessions use it too, for
        # `refresh`. With --jwks-url, building it fetches the keys, before we accept.
        verifier = token_verifier(config)
        self.verify_token: Callable[[str], Identity] | None = (
            None if verifier is None else verifier.verify)
        self.verify_claims: Callable[[str], tuple[Identity, dict[str, Any]]] | None = (
            None if verifier is None else verifier.verify_claims)
        # (host, port) of the connection whose upgrade request the factory is answering
        # (FirstRequest hands each request over whole, so the factory runs within it)
        self.peer: tuple[str, int] | None = None
        hub.verify_token = self.verify_token
        self.refused_full_total = 0
        # Set when the worker leaves (SIGTERM, or replaced): upgrades get 503 from then on.
        self.draining = False

    def reconfigure(self, config: Config, verify_token: Callable[[str], Identity] | None,
                    max_connections: int) -> None:
        """A reload: new upgrades (and `refresh`) check tokens with `verify_token`, and
        the new limits; open connections keep the identity they have."""
        self._config = config
        self._max_connections = max_connections
        self.verify_token = verify_token
        self._hub.verify_token = verify_token

    def accept(self) -> Any:
        """The protocol of a connection the port just accepted, counted until it is gone.

        Gone is connection_lost, for a connection that had its connection_made: a plain
        TCP connection always has it (the loop calls it on its next turn). One whose TLS
        handshake fails or times out has neither: the TLS layer ends it within the
        handshake timeout (the worker gives it that), so a protocol still without a
        transport a moment after that has ended unannounced. (Only then is the protocol
        held that long: held for every plain connection, 2,500 connects in 3 s kept 12 MiB.)
        In front of picows's protocol, FirstRequest answers a HEAD.
        """
        protocol = self._protocol(*self._protocol_arguments)
        self.open_connections += 1
        if self._config.tls_cert is not None:
            asyncio.get_running_loop().call_later(
                self._handshake_timeout + UNANNOUNCED_END_MARGIN, self._uncount_if_never_made,
                protocol)
        return FirstRequest(protocol, self)

    def _uncount_if_never_made(self, protocol: Any) -> None:
        if protocol.transport is None:
            self.open_connections -= 1

    def __call__(self, request: WSUpgradeRequest) -> Route | asyncio.Future[Route]:
        try:
            return self._route(request)
        except Exception:
            # picows would send the exception's text to the client: keep it in our log.
            log.exception("handshake failed")
            return _response(500, b"500 Internal Server Error\n")

    def _route(self, request: WSUpgradeRequest) -> Route | asyncio.Future[Route]:
        path, _, query = request.path.partition(b"?")
        if path == b"/health":
            return _response(200, b"ok\n")
        if path == b"/ready":
            reasons = self._why_not_ready()
            if not reasons:
                return _response(200, b"ready\n")
            return _response(503, ", ".join(reasons).encode() + b"\n")
        if path == b"/metrics" and self._config.metrics_public:
            response = WSUpgradeResponse.create_ok_response(self._metrics(), _PROMETHEUS)
            return WSUpgradeResponseWithListener(response, None)
        if path == b"/fastfan.js":
            response = WSUpgradeResponse.create_ok_response(_BROWSER_CLIENT, _JAVASCRIPT)
            return WSUpgradeResponseWithListener(response, None)
        echo = path == self._echo_path
        pusher_key = path[5:] if self.pusher_api is not None and path.startswith(b"/app/") \
            else None
        if path not in self._socket_paths and not echo and pusher_key is None:
            return None
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return _response(426, b"426 Upgrade Required: this is a WebSocket endpoint; "
                                  b"open it with a WebSocket client (ws:// or wss://)\n",
                             {"Upgrade": "websocket"})
        if self.draining:
            return _response(503, b"503 Service Unavailable: this server is shutting down; "
                                  b"connect again (to another node)\n", {"Retry-After": "1"})
        if self.open_connections > self._max_connections:  # this one counted too
            self.refused_full_total += 1
            return _response(503, b"503 Service Unavailable: connection limit reached, "
                                  b"try another node or later\n", {"Retry-After": "1"})
        if pusher_key is not None:
            # Pusher's clients are not authenticated at the upgrade: private and presence
            # channels are, each by its signature. An unknown key upgrades, then gets
            # pusher:error 4001 (what pusher-js understands).
            assert self.pusher_api is not None
            return self._session(request, ANONYMOUS, False, None, None, PusherConnection(
                self.pusher_api.pusher, pusher_key.decode("latin-1"), query))
        hooks = self._hub.hooks
        try:
            if hooks is not None and hooks.app.authenticate_hook is not None and not echo:
                return self._ask_authenticate(hooks, request, path, query)
            identity = self._authenticate(request, query)
        except AuthError as exc:
            return self._unauthorized(exc)
        return self._session(request, identity, echo, None, None)

    def _unauthorized(self, exc: AuthError) -> Route:
        self.auth_failures_total += 1
        reason = " ".join(str(exc).split())  # one line, whatever a library put in it
        return _response(401, f"401 Unauthorized: {reason}\n".encode(errors="replace"),
                         {"WWW-Authenticate": "Bearer"})

    def _session(self, request: WSUpgradeRequest, identity: Identity, echo: bool,
                 hook_request: HookRequest | None, hook_identity: HookIdentity | None,
                 dialect: PusherConnection | None = None) -> Route:
        """The Session of an authenticated upgrade, with permessage-deflate if the client
        offers it (with --app, its Connection too; with a `dialect`, another protocol's
        connection, which hooks do not see)."""
        per_user = self._config.max_connections_per_user
        if per_user and identity is not ANONYMOUS and \
                self._hub.connections_of(identity.user) >= per_user:
            self.refused_full_total += 1
            return _response(429, f"429 Too Many Requests: {identity.user} has {per_user} "
                                  f"connections open, the most --max-connections-per-user "
                                  f"allows\n".encode(), {"Retry-After": "1"})
        _accept_any_connection_header(request)
        if self._hub.hooks is not None and not echo and dialect is None:
            hook_request = hook_request or self._hook_request(request, None, None)
        # the clientId the hooks are told (the connect proxy's `client`), if any
        client_id = None if hook_request is None else hook_request.client_id.encode()
        deflate = self._config.compression and _accept_deflate(
            request.headers.getall("Sec-WebSocket-Extensions", ()))
        if not deflate:
            session = Session(self._hub, identity, echo, client_id=client_id)  # picows's 101
            route: Route = session
        else:
            extension, compressed = deflate
            session = Session(self._hub, identity, echo, True, compressed, client_id)
            response = WSUpgradeResponse.create_101_response(
                {"Sec-WebSocket-Extensions": extension})
            route = WSUpgradeResponseWithListener(response, session)
        session.dialect = dialect
        if hook_request is not None:
            self._hub.hooks.attach(session, identity, hook_identity, hook_request)
        return route

    def _hook_request(self, request: WSUpgradeRequest, token: str | None,
                      claims: dict[str, Any] | None) -> HookRequest:
        """The upgrade request as hooks see it (fastfan.Request), with the clientId the
        connection will have: a backend that answers the connect proxy knows it later."""
        path, _, query = request.path.partition(b"?")
        return HookRequest(
            path=path.decode(errors="replace"),
            query={name: values[0] for name, values in
                   parse_qs(query.decode("latin-1")).items()},
            headers=CIMultiDictProxy(request.headers), peer=self.peer, token=token,
            claims=claims, client_id=self._hub.new_client_id().decode("ascii"))

    def _ask_authenticate(self, hooks: Hooks, request: WSUpgradeRequest, path: bytes,
                          query: bytes) -> Route | asyncio.Future[Route]:
        """The App's authenticate decides: with a token key a bad token is a 401 before it,
        a good one reaches it as `claims`. Its answer now, or a future picows waits for
        (the patched picows: patches/README.md)."""
        token = _token_from(request, query)
        claims = None
        token_identity = None
        if token is not None and self.verify_claims is not None:
            token_identity, claims = self.verify_claims(token)
        hook_request = self._hook_request(request, token, claims)
        hook = hooks.app.authenticate_hook
        assert hook is not None
        answer: asyncio.Future[Route] = asyncio.get_running_loop().create_future()

        def identified(result: Any) -> None:
            if result is None and token_identity is not None:
                result = HookIdentity(user=token_identity.user)
            if not isinstance(result, HookIdentity):
                raise BadReturn("authenticate must return a fastfan.Identity, not "
                                f"{result!r:.100}")
            try:
                identity = identity_of(result, token_identity)
            except (AuthError, TypeError, ValueError) as exc:
                raise BadReturn(f"authenticate's Identity: {exc}") from None
            answer.set_result(self._session(request, identity, False, hook_request, result))

        def refused(code: int, message: str, shape: dict[str, Any] | None) -> None:
            status = code if 400 <= code <= 599 else 403
            if status == 401:
                self.auth_failures_total += 1
            reason = " ".join(message.split())
            phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ \
                else "Refused"
            answer.set_result(_response(
                status, f"{status} {phrase}: {reason}\n".encode(errors="replace"),
                {"WWW-Authenticate": "Bearer"} if status == 401 else None))

        hooks.run("authenticate", lambda: hook(hook_request), identified, refused)
        return answer.result() if answer.done() else answer

    def _authenticate(self, request: WSUpgradeRequest, query: bytes) -> Identity:
        if self.verify_token is None:
            if self._config.pusher_app and not self._config.insecure:
                raise AuthError("this server takes Pusher connections only (/app/KEY): "
                                "fastfan's protocol needs a token key")
            return ANONYMOUS  # --insecure, or --app's authenticate alone: nobody is checked
        token = _token_from(request, query)
        if token is None:
            raise AuthError("missing token: send 'Authorization: Bearer <token>' or ?token=")
        return self.verify_token(token)


# The Pusher HTTP API's requests, and the starts FirstRequest waits to see whole before it
# knows whose a connection is.
_PUSHER_API_STARTS = (b"GET /apps/", b"POST /apps/", b"POST /users/")
_WAIT_FOR_HEAD = (b"HEAD ",)
_WAIT_FOR = (*_WAIT_FOR_HEAD, *_PUSHER_API_STARTS)
# The longest request head a HEAD may have, as picows's limit for a GET's.
MAX_HEAD_REQUEST = 16 * 1024
# Where every FirstRequest reads: uvloop (and its TLS layer) calls get_buffer and, at
# once, buffer_updated for one read, so one buffer serves every connection.
_SCRATCH = memoryview(bytearray(MAX_HEAD_REQUEST))


class FirstRequest(asyncio.BufferedProtocol):
    """A connection until its method is known, in front of picows's protocol.

    picows answers any method but GET with `400 Unsupported HTTP method`. A HEAD is
    answered here as the factory answers its GET (same status and headers), without the
    body. Any other request goes to picows's protocol, which takes the connection over
    (`set_protocol`): a WebSocket's frames never pass through here.
    """

    def __init__(self, protocol: Any, factory: ListenerFactory) -> None:
        self._protocol = protocol  # picows's WSProtocol
        self._factory = factory
        self._transport: Any = None
        self._received = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._protocol.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return bool(self._protocol.eof_received())

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SCRATCH

    def buffer_updated(self, nbytes: int) -> None:
        self._received += _SCRATCH[:nbytes]
        pusher_api = self._factory.pusher_api
        if self._received.startswith(b"HEAD "):
            self._answer_head()
        elif pusher_api is not None and self._received.startswith(_PUSHER_API_STARTS):
            self._hand_to_http(pusher_api)
        elif not any(len(self._received) < len(start) and start.startswith(self._received)
                     for start in (_WAIT_FOR if pusher_api is not None else _WAIT_FOR_HEAD)) \
                and (b"\r\n\r\n" in self._received or len(self._received) > MAX_HEAD_REQUEST):
            self._hand_over()

    def _hand_to_http(self, pusher_api: PusherApi) -> None:
        """A request of the Pusher HTTP API: fastfan.http_server's from here on (POST
        bodies, keep-alive). picows's protocol ends here: its handshake timer and count."""
        self._protocol.connection_lost(None)
        connection = HttpConnection(pusher_api.http)
        self._transport.set_protocol(connection)
        connection.connection_made(self._transport)
        connection.data_received(bytes(self._received))

    def _hand_over(self) -> None:
        """picows's protocol reads from here on, starting with the whole request head (or
        more than picows takes): the factory answers it within this call, knowing the
        peer."""
        self._transport.set_protocol(self._protocol)
        received = memoryview(self._received)
        self._factory.peer = self._transport.get_extra_info("peername")
        try:
            while received and not self._transport.is_closing():
                buffer = self._protocol.get_buffer(-1)
                size = min(len(buffer), len(received))
                buffer[:size] = received[:size]
                received = received[size:]
                self._protocol.buffer_updated(size)
        finally:
            self._factory.peer = None

    def _answer_head(self) -> None:
        end = self._received.find(b"\r\n\r\n")
        if end < 0:
            if len(self._received) >= MAX_HEAD_REQUEST:
                self._close_with(WSUpgradeResponse.create_error_response(
                    431, b"431 Request Header Fields Too Large\n"), b"")
            return
        request = WSUpgradeRequest()
        request.method, _, rest = bytes(self._received[:end]).partition(b" ")
        request.path, _, request.version = rest.partition(b"\r\n")[0].partition(b" ")
        # No headers: a HEAD is never an upgrade, so the WebSocket path answers 426.
        request.headers = CIMultiDict()
        route = self._factory(request)
        # None is picows's 404; a Session needs the Upgrade header this request lacks.
        response = route.response if isinstance(route, WSUpgradeResponseWithListener) \
            else WSUpgradeResponse.create_error_response(404, b"404 Not Found")
        self._close_with(response, response.body or b"")

    def _close_with(self, response: WSUpgradeResponse, body: bytes) -> None:
        """Send the response's status and headers, and Content-Length for `body`, then
        close (what picows does after any answer but 101)."""
        response.headers["Content-Length"] = str(len(body))
        response.headers["Connection"] = "close"
        response.body = None
        self._transport.write(bytes(response.to_bytes()))
        self._transport.close()


def _token_from(request: WSUpgradeRequest, query: bytes) -> str | None:
    """The header wins over the query string, as the contract says."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("Authorization header must be 'Bearer <token>'")
        return token.strip()
    values = parse_qs(query.decode("latin-1")).get("token")
    return values[0] if values else None


def _accept_deflate(offers: Sequence[str]) -> tuple[str, bool] | None:
    """The first permessage-deflate offer in the Sec-WebSocket-Extensions headers that we can
    take (RFC 7692), as the response's header and whether this client gets compressed
    frames; None when there is none.

    We always answer with server_no_context_takeover and client_no_context_takeover: every
    message stands alone, so one compressed frame serves every subscriber and one inflater
    every client. A client that limits our window (server_max_window_bits 9 to 14) gets
    the extension, so its compressed messages are inflated, but plain frames from us: the
    frames compressed once for everyone use the full window (--echo-path excepted, which
    compresses each echo in a small window). zlib has no 8-bit window: that is declined.
    """
    for header in offers:
        for offer in header.split(","):
            name, *params = (part.strip() for part in offer.split(";"))
            if name.lower() != "permessage-deflate":
                continue
            window = _deflate_params(params)
            if window is None:
                continue  # RFC 7692 5: decline an offer with a bad parameter, try the next
            extension = "permessage-deflate; server_no_context_takeover; " \
                        "client_no_context_takeover"
            if window:
                extension += f"; server_max_window_bits={window}"
            return extension, window in (0, 15)
    return None


_WINDOW_BITS = {str(bits) for bits in range(8, 16)}
# zlib's smallest raw deflate window is 9 bits: an offer that limits ours to 8 is declined.
_OUR_WINDOW_BITS = {str(bits) for bits in range(9, 16)}


def _deflate_params(params: list[str]) -> int | None:
    """The offer's server_max_window_bits (0 when absent), or None if a parameter is
    unknown, repeated or has a bad value (RFC 7692 7.1)."""
    seen: set[str] = set()
    window = 0
    for param in params:
        key, has_value, value = (part.strip() for part in param.partition("="))
        key = key.lower()
        value = value.strip('"')  # a quoted-string value is allowed (RFC 7692 7.1)
        if key in seen:
            return None
        seen.add(key)
        if key in ("server_no_context_takeover", "client_no_context_takeover"):
            if has_value:
                return None
        elif key == "server_max_window_bits":
            if value not in _OUR_WINDOW_BITS:
                return None
            window = int(value)
        elif key == "client_max_window_bits":
            if has_value and value not in _WINDOW_BITS:
                return None  # we never limit the client's window: its value is not ours to use
        else:
            return None
    return window


def _accept_any_connection_header(request: WSUpgradeRequest) -> None:
    """picows wants `Connection: Upgrade` exactly; Firefox sends `keep-alive, Upgrade`."""
    value = request.headers.get("Connection", "")
    if value == "Upgrade":
        return  # the common case, already as picows wants it
    if any(token.strip().lower() == "upgrade" for token in value.split(",")):
        request.headers["Connection"] = "Upgrade"
