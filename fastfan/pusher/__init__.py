"""Pusher Channels protocol 7 on fastfan's core: pusher-js, Laravel Echo and the Pusher server
libraries talk to fastfan unchanged.

The protocol is a dialect of the connection, not a part of the Session: a Session with a
`dialect` hands it each whole text message (fastfan.pusher.protocol), and the core keeps
the framing, the RFC 6455 rules and the fan-out. A Pusher channel C of app ID is the bus
channel `pusher.ID.C` (bus_channel): its events are encoded once per channel as Pusher
frames (`{"event":E,"channel":C,"data":D}`) and every bus (embedded, Redis, shards,
Cluster) carries them as it carries fastfan's messages.

An event that leaves connections out travels as the channel's other events do, wrapped
(`{"except":{"socket_id":S}|{"user_id":U},"frame":F}`, fastfan._core.EXCEPTING_PREFIX):
the Hub of each worker hands it to Pusher.fanout_excepting, which fans out F to all but
the connection S or U's connections there. So it keeps its place among the channel's
events on every bus (one Redis shard carries both): a trigger with `socket_id`, and the
member events, which never reach the connections of the member they are about.

Members: `pusher_internal:member_added` when a user's first connection joins a presence
channel anywhere, `member_removed` when their last one leaves: the bus's transitions
(Bus.watch_transitions), decided once for the deployment, whose worker publishes the
event (Pusher is a Transitions listener).

Here: the apps (`--pusher-app ID:KEY:SECRET`) and the worker's Pusher side (Pusher): its
connections by socket id, the ids, the encoding. The signatures are fastfan.pusher.auth's,
the HTTP API fastfan.pusher.api's.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from .._core import EXCEPTING_PREFIX, BusResult, Hub, Session
from ..bus.base import Acknowledger, Presence
from ..bus.commands import EXTENSIONS, Command, encode_command

# Pusher's channel names: these characters, at most this long.
CHANNEL_NAME = re.compile(r"[A-Za-z0-9_\-=@,.;]{1,164}")
# A signed-in user's own channel (pusher:signin): only that user's connections subscribe,
# the backend sends to it (sendToUser).
SERVER_TO_USER = "#server-to-user-"
# An app's id and key as the URL paths carry them.
APP_FIELD = re.compile(r"[A-Za-z0-9_\-.]{1,100}")
# A bus channel of a Pusher app begins with this, then the app's id and a dot.
BUS_PREFIX = "pusher."
# Presence channels of every app, for the worker's presence patterns.
PRESENCE_PATTERN = BUS_PREFIX + "*.presence-*"
# Cache channels keep their latest event (fastfan's history, at least one message, for
# --history-ttl): a subscriber gets it at once, or pusher:cache_miss.
CACHE_PREFIXES = ("cache-", "private-cache-", "private-encrypted-cache-", "presence-cache-")
CACHE_PATTERNS = [f"{BUS_PREFIX}*.{prefix}*" for prefix in CACHE_PREFIXES]
# The bus command that closes a signed-in user's connections on every worker.
TERMINATE = "pusher_terminate"
# The close code of a connection terminated by the API (Pusher's: do not reconnect as is).
TERMINATED = 4009




class _Except(msgspec.Struct, forbid_unknown_fields=False):
    socket_id: str | None = None
    user_id: str | None = None


class _Excepting(msgspec.Struct, forbid_unknown_fields=False):
    except_: _Except = msgspec.field(name="except")
    frame: msgspec.Raw = msgspec.Raw(b"")


_decode_excepting = msgspec.json.Decoder(_Excepting).decode


class PusherAppError(ValueError):
    """An --pusher-app that is not ID:KEY:SECRET."""


@dataclass(frozen=True)
class PusherApp:
    id: str
    key: str
    secret: str

    def bus_channel(self, channel: str) -> str:
        """The fastfan channel that carries Pusher channel `channel` of this app."""
        return f"{BUS_PREFIX}{self.id}.{channel}"


def is_channel_name(name: str) -> bool:
    """A Pusher channel's name, or a signed-in user's own channel."""
    if name.startswith(SERVER_TO_USER):
        name = name[len(SERVER_TO_USER):]
    return CHANNEL_NAME.fullmatch(name) is not None


def parse_app(text: str) -> PusherApp:
    """`ID:KEY:SECRET` (the secret may hold colons)."""
    app_id, _, rest = text.strip().partition(":")
    key, _, secret = rest.partition(":")
    if not APP_FIELD.fullmatch(app_id) or not APP_FIELD.fullmatch(key) or not secret:
        raise PusherAppError(
            f"--pusher-app takes ID:KEY:SECRET (id and key of letters, digits, '_-.'; a "
            f"secret), got {text.split(':', 2)[0]!r}:…")
    return PusherApp(app_id, key, secret)


def parse_apps(specs: Iterable[str]) -> list[PusherApp]:
    """Every app, each id and each key once."""
    apps = [parse_app(spec) for spec in specs]
    for field in ("id", "key"):
        values = [getattr(app, field) for app in apps]
        if len(set(values)) != len(values):
            raise PusherAppError(f"--pusher-app: two apps have the same {field}")
    return apps


def read_app_file(path: str) -> list[str]:
    """The ID:KEY:SECRET lines of a file (blank lines and `#` comments skipped)."""
    with open(path, encoding="utf-8") as file:
        return [line.strip() for line in file
                if line.strip() and not line.lstrip().startswith("#")]


def encode_event(event: str, channel: str | None, data: Any,
                 user_id: str | None = None) -> bytes:
    """A Pusher frame; `data` as it goes on the wire (a JSON string where Pusher's is)."""
    frame: dict[str, Any] = {"event": event}
    if channel is not None:
        frame["channel"] = channel
    frame["data"] = data
    if user_id is not None:
        frame["user_id"] = user_id
    return msgspec.json.encode(frame)


def excepting(frame: bytes, *, socket_id: str | None = None,
              user_id: str | None = None) -> bytes:
    """`frame` for every subscriber but the connection `socket_id`, or `user_id`'s
    connections, wherever they are (see the module's docstring)."""
    left_out = {"socket_id": socket_id} if socket_id is not None else {"user_id": user_id}
    return b"".join((EXCEPTING_PREFIX, msgspec.json.encode(left_out), b',"frame":', frame,
                     b"}"))


def unwrapped(payload: bytes) -> bytes:
    """The frame of a payload kept as it was published (a cache channel's latest event)."""
    if not payload.startswith(EXCEPTING_PREFIX):
        return payload
    return bytes(_decode_excepting(payload).frame)


def event_from_api(bus_channel: str, data: bytes) -> bytes:
    """What fastfan's server API publishes to `pusher.ID.C`, as the Pusher event its
    clients expect: `data` is `{"event":E,"data":D}` (D a string, or any JSON value, sent
    as its JSON text). ValueError says what is wrong."""
    channel = bus_channel[len(BUS_PREFIX):].partition(".")[2]
    try:
        message = msgspec.json.decode(data)
    except msgspec.DecodeError:
        raise ValueError("'data' is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("event"), str) \
            or not message["event"]:
        raise ValueError(f"a publish to {bus_channel} (a Pusher channel) needs 'data' "
                         '{"event":NAME,"data":...}')
    payload = message.get("data")
    if not isinstance(payload, str):
        payload = msgspec.json.encode(payload).decode()
    return encode_event(message["event"], channel, payload)


class Pusher:
    """One worker's Pusher side: the apps, its connections by socket id and by presence
    member, and the member events of the deployment's transitions (a Transitions)."""

    def __init__(self, apps: Iterable[PusherApp], hub: Hub, *, activity_timeout: int,
                 client_event_rate: float = 10.0) -> None:
        self.apps_by_key = {app.key: app for app in apps}
        self.apps_by_id = {app.id: app for app in self.apps_by_key.values()}
        self.hub = hub
        self.activity_timeout = activity_timeout
        self.client_event_rate = client_event_rate
        # socket ids are "worker.n": a random number per worker process, then a counter
        self._worker_number = secrets.randbelow(10**9) + 1
        self._next = 0
        self.sockets: dict[str, Session] = {}
        # (bus channel, user) -> the connections here through which the user is a member
        self.members: dict[tuple[str, str], list[Session]] = {}
        # (bus channel, user) -> the member events held behind a gather of the user's info
        self._held: dict[tuple[str, str], list[bytes]] = {}
        # --webhook-format pusher: (bus channel, event, data, socket_id, user_id or None)
        # of each client event; None when off
        self.client_event_webhook: Callable[[str, str, Any, str, str | None], None] | None \
            = None
        EXTENSIONS[TERMINATE] = self._terminate
        hub.excepting = self.fanout_excepting

    def new_socket_id(self) -> str:
        self._next += 1
        return f"{self._worker_number}.{self._next}"

    def publish(self, app: PusherApp, channel: str, payload: bytes,
                exclude: Session | None = None) -> bool:
        """`payload` (a Pusher frame) to every subscriber of `channel` everywhere but
        `exclude`; False when the bus refused it."""
        return self._publish(app.bus_channel(channel), payload, exclude) != BusResult.REFUSED

    def _publish(self, bus_channel: str, payload: bytes, exclude: Session | None,
                 ack: Acknowledger | None = None) -> int:
        """On a channel with history (a cache channel), numbered and kept. A BusResult;
        PENDING: `ack` hears once the bus has it."""
        bus = self.hub.bus
        publish = bus.publish_history if self.hub.keeps_history(bus_channel) else bus.publish
        return int(publish(bus_channel, payload, ack, b"", exclude))

    def publish_for_api(self, app: PusherApp, channel: str, payload: bytes,
                        socket_id: str | None, ack: Acknowledger) -> int:
        """`payload` to every subscriber of `channel`, but the connection `socket_id` if
        given, wherever it is (wrapped: see the module's docstring). A BusResult; PENDING:
        `ack` hears once the bus has it."""
        if socket_id is not None:
            payload = excepting(payload, socket_id=socket_id)
        return self._publish(app.bus_channel(channel), payload, None, ack)

    def fanout_excepting(self, channel: str, payload: bytes | bytearray | memoryview) -> int:
        """The Hub's `excepting`: what `payload` wraps to this worker's subscribers of
        `channel` but those it leaves out."""
        try:
            wrapped = _decode_excepting(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return 0  # not a Pusher event: nothing to deliver
        frame = bytes(wrapped.frame)
        left_out = wrapped.except_
        if left_out.socket_id is not None:
            session = self.sockets.get(left_out.socket_id)
            return self.hub.fanout(channel, frame, session)
        here = self.members.get((channel, left_out.user_id or ""), [])
        if len(here) <= 1:
            return self.hub.fanout(channel, frame, here[0] if here else None)
        # The user joined through several connections here at once (a rare race): each
        # other subscriber, one by one.
        delivered = 0
        for session in self.hub.sessions:
            if channel in session.subscriptions and session not in here:
                session.send_text(frame)
                delivered += 1
        return delivered

    # Members --------------------------------------------------------------------------

    def member_here(self, bus_channel: str, user: str, session: Session) -> None:
        """`session` is about to join presence channel `bus_channel` as `user`."""
        self.members.setdefault((bus_channel, user), []).append(session)

    def member_gone(self, bus_channel: str, user: str, session: Session) -> None:
        sessions = self.members.get((bus_channel, user))
        if sessions is not None and session in sessions:
            sessions.remove(session)
            if not sessions:
                del self.members[bus_channel, user]

    def occupied(self, channel: str) -> None:
        """(A Transitions: channels filling and emptying are the webhooks' business.)"""

    def vacated(self, channel: str) -> None:
        """See occupied."""

    def member_added(self, channel: str, user: str) -> None:
        """`user`'s first connection joined presence channel `channel` somewhere: the
        other members hear of it with the user's info, from a connection of theirs here
        or else gathered (the events of that user and channel wait behind the gather)."""
        name = self._presence_name(channel)
        if name is None:
            return
        key = (channel, user)
        here = self.members.get(key)
        held = self._held.get(key)
        if held is not None:  # behind a gather still out: in turn, with what is known here
            held.append(self._member_added(name, user, here[0].identity.info if here else ""))
        elif here:
            self._publish_member(channel, self._member_added(name, user, here[0].identity.info))
        else:
            self._held[key] = [b""]  # its place, filled once the info is gathered

            def gathered(presence: Presence | None) -> None:
                info = next((info for _, member, info in presence[2] if member == user),
                            "") if presence is not None else ""
                events = self._held.pop(key)
                events[0] = self._member_added(name, user, info)
                for event in events:
                    self._publish_member(channel, event)

            self.hub.bus.gather_presence(channel, gathered)  # fresh: not the Hub's cache

    def member_removed(self, channel: str, user: str) -> None:
        """`user`'s last connection left presence channel `channel` everywhere."""
        name = self._presence_name(channel)
        if name is None:
            return
        removed = excepting(encode_event("pusher_internal:member_removed", name,
                                         msgspec.json.encode({"user_id": user}).decode()),
                            user_id=user)
        held = self._held.get((channel, user))
        if held is not None:
            held.append(removed)
        else:
            self._publish_member(channel, removed)

    def _presence_name(self, bus_channel: str) -> str | None:
        """The Pusher channel of a presence bus channel of one of the apps, else None."""
        if not bus_channel.startswith(BUS_PREFIX):
            return None
        app_id, _, name = bus_channel[len(BUS_PREFIX):].partition(".")
        if app_id not in self.apps_by_id or not name.startswith("presence-"):
            return None
        return name

    @staticmethod
    def _member_added(name: str, user: str, info: str) -> bytes:
        added = msgspec.json.encode({"user_id": user, "user_info": msgspec.Raw(
            info.encode()) if info else None})
        return excepting(encode_event("pusher_internal:member_added", name, added.decode()),
                         user_id=user)

    def _publish_member(self, channel: str, event: bytes) -> None:
        """Not kept as a cache channel's latest event: that is for the app's events."""
        self.hub.bus.publish(channel, event, None, b"")

    def terminate(self, app: PusherApp, user: str, ack: Acknowledger) -> int:
        """Close every connection signed in as `user` of `app`, on every worker and node
        (a bus command). A BusResult, as publish_for_api's."""
        return int(self.hub.bus.command(encode_command(TERMINATE, user, data=app.id), ack))

    def _terminate(self, command: Command) -> None:
        for session in list(self.sockets.values()):
            connection = session.dialect
            if connection.user == command.user and connection.app.id == command.data:
                session.close(TERMINATED, "Connection terminated by the server")
