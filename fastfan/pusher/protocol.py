"""Pusher's WebSocket protocol 7 on a fastfan Session: one PusherConnection per connection,
its `dialect` (fastfan._core.Session.dialect).

The Session gives it each whole text message (`handle`) and tells it of the connection's
start and end, the Hub of a subscription the bus confirmed (`confirmed`); it answers
through the Session (`send_text`, `close`) and subscribes it to the bus channels of the
Pusher channels (`subscribe_to`), whose events the core fans out as they are. Presence
is fastfan's: the connection takes the presence user as its identity (`take_identity`),
and the members are the channel's subscribers on every worker and node
(Hub.gather_presence); member_added and member_removed are the bus's transitions
(fastfan.pusher.Pusher.member_added).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs

import msgspec

from .. import auth as fastfan_auth
from .._core import Session
from ..bus.base import Presence
from ..history import HistoryAnswer
from . import (
    CACHE_PREFIXES,
    SERVER_TO_USER,
    TERMINATED,
    Pusher,
    PusherApp,
    encode_event,
    is_channel_name,
    unwrapped,
)
from .auth import SignatureError, check_channel_auth, check_user_auth

# Pusher's close and error codes (pusher.com/docs/channels/library_auth_reference/pusher-
# websockets-protocol): 4001 no such app, 4006-4008 the `protocol` of the URL's query is
# not a number, not one spoken here, or missing; 4009 unauthorized, 4301 client events
# too fast.
APP_DOES_NOT_EXIST = 4001
INVALID_VERSION = 4006
UNSUPPORTED_PROTOCOL = 4007
NO_PROTOCOL = 4008
OVER_RATE_LIMIT = 4301
# The protocol version spoken here (pusher-js 8 connects with ?protocol=7).
PROTOCOL = "7"
# Channel kinds by prefix; `private-encrypted-` is a private channel whose data the
# clients encrypt: it is relayed as it is.
PRIVATE = "private-"
PRESENCE = "presence-"
# Bytes of presence user_info, as Pusher limits them.
MAX_USER_INFO = 1024


class _Message(msgspec.Struct, forbid_unknown_fields=False):
    event: str = ""
    data: Any = None
    channel: str | None = None


_decode = msgspec.json.Decoder(_Message).decode


def _protocol_refusal(query: bytes) -> tuple[int, str] | None:
    """What Pusher answers a `protocol` it does not speak, or None for PROTOCOL."""
    versions = parse_qs(query.decode("latin-1")).get("protocol")
    if not versions:
        return NO_PROTOCOL, "No protocol version supplied"
    if not versions[0].isdigit():
        return INVALID_VERSION, "Invalid version string format"
    if versions[0].lstrip("0") != PROTOCOL:
        return UNSUPPORTED_PROTOCOL, (f"Unsupported protocol version {versions[0][:20]}: "
                                      f"this server speaks {PROTOCOL}")
    return None


def _signed(channel: str) -> bool:
    return channel.startswith((PRIVATE, PRESENCE))


class PusherConnection:
    """One Pusher connection: its app, socket id, Pusher channels and client-event bucket."""

    __slots__ = ("app", "channels", "key", "pusher", "refill_at", "refusal", "socket_id",
                 "subscribe_refill_at", "subscribe_tokens", "tokens", "user")

    def __init__(self, pusher: Pusher, key: str, query: bytes = b"") -> None:
        self.pusher = pusher
        self.key = key
        self.app: PusherApp | None = pusher.apps_by_key.get(key)
        # the pusher:error code and message that close it once connected, if any
        self.refusal = _protocol_refusal(query)
        self.socket_id = ""
        self.channels: set[str] = set()  # Pusher channel names subscribed
        self.tokens = 2 * pusher.client_event_rate
        self.refill_at = time.monotonic()
        self.user = ""  # signed in as (pusher:signin), "" until then
        # --subscribe-rate, as fastfan's clients have it: bursts of all its channels
        self.subscribe_tokens = self._subscribe_burst()
        self.subscribe_refill_at = self.refill_at

    # The Session's calls ------------------------------------------------------------

    def connected(self, session: Session) -> None:
        if self.app is None:
            self._error(session, APP_DOES_NOT_EXIST,
                        f"App key {self.key} does not exist on this server")
            session.close(APP_DOES_NOT_EXIST, "App does not exist")
            return
        if self.refusal is not None:
            code, message = self.refusal
            self._error(session, code, message)
            session.close(code, message)
            self.app = None  # nothing it sends is handled
            return
        self.socket_id = self.pusher.new_socket_id()
        self.pusher.sockets[self.socket_id] = session
        data = msgspec.json.encode({"socket_id": self.socket_id,
                                    "activity_timeout": self.pusher.activity_timeout})
        session.send_text(encode_event("pusher:connection_established", None, data.decode()))

    def disconnected(self, session: Session) -> None:
        """The Session has left every bus channel already: the presence channels it was in
        may have lost a member."""
        self.pusher.sockets.pop(self.socket_id, None)
        for channel in self.channels:
            if channel.startswith(PRESENCE):
                assert self.app is not None
                self.pusher.member_gone(self.app.bus_channel(channel), session.identity.user,
                                        session)
        self.channels = set()

    def handle(self, session: Session, text: bytes) -> None:
        if self.app is None:
            return
        try:
            message = _decode(text)
        except msgspec.DecodeError:
            self._error(session, None, "Invalid JSON: every message is a Pusher event object")
            return
        event = message.event
        if event == "pusher:ping":
            session.send_text(b'{"event":"pusher:pong","data":"{}"}')
        elif event == "pusher:subscribe":
            self._subscribe(session, message.data)
        elif event == "pusher:signin":
            self._signin(session, message.data)
        elif event == "pusher:unsubscribe":
            channel = message.data.get("channel") if isinstance(message.data, dict) else None
            if isinstance(channel, str) and channel in self.channels:
                self._unsubscribe(session, channel)
        elif event.startswith("client-"):
            self._client_event(session, event, message.channel, text)
        elif event != "pusher:pong":
            self._error(session, None, f"Unsupported event {event[:100]!r}")

    # Subscriptions ------------------------------------------------------------------

    def _subscribe(self, session: Session, data: Any) -> None:
        assert self.app is not None
        channel = data.get("channel") if isinstance(data, dict) else None
        if not isinstance(channel, str) or not is_channel_name(channel):
            self._error(session, None, "pusher:subscribe needs a valid 'channel' name")
            return
        if channel in self.channels:
            return
        if channel.startswith(SERVER_TO_USER) and (
                not self.user or channel != SERVER_TO_USER + self.user):
            self._subscription_error(session, channel, 403, "only the user signed in as "
                                     f"{channel[len(SERVER_TO_USER):]} may subscribe")
            return
        channel_data = data.get("channel_data")
        if _signed(channel):
            if channel.startswith(PRESENCE) and not isinstance(channel_data, str):
                self._subscription_error(session, channel, 401, "a presence channel needs "
                                         "'channel_data' from the app's auth endpoint")
                return
            try:
                check_channel_auth(self.app, self.socket_id, channel, data.get("auth"),
                                   channel_data if channel.startswith(PRESENCE) else None)
            except SignatureError as exc:
                self._subscription_error(session, channel, 401, str(exc))
                return
        hub = self.pusher.hub
        if len(session.subscriptions) >= hub.max_subscriptions:
            self._subscription_error(session, channel, 429, "subscription limit reached")
            return
        if not self._may_subscribe():
            # Each subscribe is bus traffic, and presence's gathers: bounded per connection.
            self._subscription_error(session, channel, 429, "subscribe rate limit "
                                     f"({hub.subscribe_rate:g}/s) exceeded")
            return
        if channel.startswith(PRESENCE):
            assert isinstance(channel_data, str)
            if not self._take_presence_user(session, channel, channel_data):
                return
            self.pusher.member_here(self.app.bus_channel(channel), session.identity.user,
                                    session)
        self.channels.add(channel)
        # A cache channel (not a presence one, whose members are gathered first) starts at
        # its latest event, through the core's seam: `latest` follows
        from_latest = channel.startswith(CACHE_PREFIXES) and not channel.startswith(PRESENCE)
        if not session.subscribe_to(self.app.bus_channel(channel), from_latest):
            self._succeeded(session, channel)

    def latest(self, session: Session, bus_channel: str, payload: bytes | None) -> None:
        """A cache channel's subscription, at the moment this connection starts receiving
        the channel (the Hub calls, before it fans out the next event to it): succeeded,
        then the latest event kept, or pusher:cache_miss. Read after subscription_succeeded
        instead, an event published meanwhile came twice, or an older one after it."""
        assert self.app is not None
        channel = bus_channel[len(self.app.bus_channel("")):]
        if channel not in self.channels:
            return
        session.send_text(encode_event("pusher_internal:subscription_succeeded",
                                       channel, "{}"))
        self._send_kept(session, channel, payload)

    def confirmed(self, session: Session, bus_channel: str) -> None:
        """The bus has the subscription (the Hub calls): every event published from now on,
        anywhere, reaches this connection."""
        assert self.app is not None
        channel = bus_channel[len(self.app.bus_channel("")):]
        if channel in self.channels:
            self._succeeded(session, channel)

    def _succeeded(self, session: Session, channel: str) -> None:
        assert self.app is not None
        if channel.startswith(PRESENCE):
            self.pusher.hub.gather_presence(
                self.app.bus_channel(channel),
                lambda presence: self._presence_succeeded(session, channel, presence))
            return
        session.send_text(encode_event("pusher_internal:subscription_succeeded",
                                       channel, "{}"))
        self._send_cached(session, channel)

    def _send_cached(self, session: Session, channel: str) -> None:
        """On a cache channel, its latest event (kept for --history-ttl), or
        pusher:cache_miss."""
        assert self.app is not None
        if not channel.startswith(CACHE_PREFIXES):
            return

        def answer(kept: HistoryAnswer | None) -> None:
            if channel in self.channels:
                self._send_kept(session, channel,
                                kept[2][-1][1] if kept is not None and kept[2] else None)

        self.pusher.hub.bus.read_history(self.app.bus_channel(channel), -1, 1, answer)

    @staticmethod
    def _send_kept(session: Session, channel: str, payload: bytes | None) -> None:
        """A cache channel's latest event as kept (None: pusher:cache_miss)."""
        session.send_text(unwrapped(payload) if payload is not None
                          else encode_event("pusher:cache_miss", channel, "{}"))

    def _signin(self, session: Session, data: Any) -> None:
        """User authentication: `auth` signs `socket_id::user::user_data` (any Pusher
        server library's authenticateUser); the connection is that user from now on. A bad
        one closes the connection with 4009, as Pusher does."""
        assert self.app is not None
        user_data = data.get("user_data") if isinstance(data, dict) else None
        try:
            check_user_auth(self.app, self.socket_id, data.get("auth") if isinstance(
                data, dict) else None, user_data)
            assert isinstance(user_data, str)
            user = msgspec.json.decode(user_data)["id"]
            if not isinstance(user, str) or not user:
                raise SignatureError("user_data needs an 'id', a non-empty string")
        except (SignatureError, msgspec.DecodeError, TypeError, KeyError) as exc:
            message = str(exc) if isinstance(exc, SignatureError) else \
                "user_data must be JSON with an 'id'"
            self._error(session, TERMINATED, f"Invalid signin: {message}")
            session.close(TERMINATED, "Invalid signin")
            return
        self.user = user
        if session.identity.user != user:
            session.take_identity(fastfan_auth.Identity(
                user, fastfan_auth.ALLOW_ALL, fastfan_auth.ALLOW_ALL, None, ""))
        session.send_text(encode_event("pusher:signin_success", None,
                                       {"user_data": user_data}))

    def _take_presence_user(self, session: Session, channel: str, channel_data: str) -> bool:
        """The connection is the user its channel_data names (one user per connection)."""
        try:
            member = msgspec.json.decode(channel_data)
            user_id = member["user_id"]
        except (msgspec.DecodeError, TypeError, KeyError):
            self._subscription_error(session, channel, 400,
                                     "channel_data must be JSON with a 'user_id'")
            return False
        if not isinstance(user_id, (str, int)) or isinstance(user_id, bool):
            self._subscription_error(session, channel, 400, "user_id must be a string")
            return False
        info = msgspec.json.encode(member.get("user_info")) if "user_info" in member else b""
        if len(info) > MAX_USER_INFO:
            self._subscription_error(session, channel, 400,
                                     f"user_info is over {MAX_USER_INFO} bytes")
            return False
        user = str(user_id)
        if session.identity.user != user or session.identity.info != info.decode():
            session.take_identity(fastfan_auth.Identity(
                user, fastfan_auth.ALLOW_ALL, fastfan_auth.ALLOW_ALL, None, info.decode()))
        return True

    def _presence_succeeded(self, session: Session, channel: str,
                            presence: Presence | None) -> None:
        """The members everywhere, this connection among them: to it, with
        subscription_succeeded."""
        if channel not in self.channels:
            return  # unsubscribed meanwhile
        members: dict[str, Any] = {}
        user = session.identity.user
        for _client, member, info in presence[2] if presence is not None else ():
            members[member] = msgspec.Raw(info.encode()) if info else None
        members.setdefault(user, msgspec.Raw(session.identity.info.encode())
                           if session.identity.info else None)
        data = msgspec.json.encode({"presence": {
            "ids": list(members), "hash": members, "count": len(members)}})
        session.send_text(encode_event("pusher_internal:subscription_succeeded", channel,
                                       data.decode()))
        self._send_cached(session, channel)

    def _unsubscribe(self, session: Session, channel: str) -> None:
        assert self.app is not None
        self.channels.discard(channel)
        session.unsubscribe_from(self.app.bus_channel(channel))
        if channel.startswith(PRESENCE):
            self.pusher.member_gone(self.app.bus_channel(channel), session.identity.user,
                                    session)

    # Client events --------------------------------------------------------------------

    def _client_event(self, session: Session, event: str, channel: str | None,
                      text: bytes) -> None:
        """To the channel's other subscribers, on private and presence channels only, at
        most `client_event_rate` a second."""
        assert self.app is not None
        if channel is None or channel not in self.channels:
            self._error(session, None, f"Client event rejected - not subscribed to {channel}")
            return
        if not _signed(channel):
            self._error(session, None, "Client event rejected - only supported on private "
                                       "and presence channels")
            return
        if not self._take_token():
            self._error(session, OVER_RATE_LIMIT, "Client event rejected - rate limit "
                        f"of {self.pusher.client_event_rate:g} a second exceeded")
            return
        data = msgspec.json.decode(text).get("data")
        user_id = session.identity.user if channel.startswith(PRESENCE) else None
        if self.pusher.publish(self.app, channel, encode_event(event, channel, data, user_id),
                               session) and self.pusher.client_event_webhook is not None:
            self.pusher.client_event_webhook(self.app.bus_channel(channel), event, data,
                                             self.socket_id, user_id)

    def _take_token(self) -> bool:
        rate = self.pusher.client_event_rate
        now = time.monotonic()
        self.tokens = min(2 * rate, self.tokens + (now - self.refill_at) * rate)
        self.refill_at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def _subscribe_burst(self) -> float:
        hub = self.pusher.hub
        return max(float(hub.max_subscriptions), 2 * hub.subscribe_rate)

    def _may_subscribe(self) -> bool:
        rate = self.pusher.hub.subscribe_rate
        now = time.monotonic()
        self.subscribe_tokens = min(self._subscribe_burst(), self.subscribe_tokens
                                    + (now - self.subscribe_refill_at) * rate)
        self.subscribe_refill_at = now
        if self.subscribe_tokens >= 1:
            self.subscribe_tokens -= 1
            return True
        return False

    # Errors ---------------------------------------------------------------------------

    @staticmethod
    def _error(session: Session, code: int | None, message: str) -> None:
        session.send_text(encode_event("pusher:error", None,
                                       {"code": code, "message": message}))

    @staticmethod
    def _subscription_error(session: Session, channel: str, status: int, message: str) -> None:
        session.send_text(encode_event("pusher:subscription_error", channel, {
            "type": "AuthError", "error": message, "status": status}))
