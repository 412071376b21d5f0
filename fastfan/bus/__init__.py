"""Message buses: how a publish on one worker reaches the Hubs of every worker.

A bus has `publish(channel, payload, session, request_id)`, which answers REFUSED (the
bus is down: the client gets 503), DONE (handed on: a `published` reply may go at once),
or PENDING (the bus calls `session.acknowledge(channel, request_id, ok)` once it knows;
only when a session is given, i.e. the client asked for an acknowledgement),
`subscribe(channel)` and `unsubscribe(channel)` (a Hub calls them when a channel gains its
first or loses its last local subscriber; `subscribe` answers True when the bus will call
`hub.confirm(channel)` once every message published anywhere afterwards reaches this
worker: until then the clients' `subscribed` replies wait), `up` for /ready,
`dropped_total` for what it could not pass on, and `start()` / `stop()`.

On a channel with history (Hub.keeps_history) a publish goes to
`publish_history(channel, payload, session, request_id)` instead: the bus numbers the
message (fastfan.history) with one sequencer per channel, keeps it, and fans it out
numbered; it answers REFUSED or PENDING, and acknowledges with the message's position
(`session.acknowledge(channel, request_id, True, position)`). `read_history(channel,
since, limit, answer)` calls `answer(HistoryAnswer)` (or `answer(None)`: the store did not
answer) with the kept messages after offset `since` (the last `limit` when `since` < 0);
and the answer reaches this worker in the stream of the channel's messages, after every
message up to its position and before every later one, once the channel is subscribed
here: Hub.subscribe_history's seam relies on it.

`command(payload, session)` carries a server API command (`disconnect`, `unsubscribe`,
encoded by `encode_command`) to every worker of every node, this one included, each of
which applies it to its own Hub with `apply_command`; it answers as `publish` does (PENDING:
`session.acknowledge(COMMANDS, b"", ok)` follows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from .._core import BusResult, Hub, is_valid_channel
from ..history import HistoryAnswer

REFUSED, DONE, PENDING = BusResult.REFUSED, BusResult.DONE, BusResult.PENDING

# Where commands travel between nodes (Redis: --redis-prefix + this): "!" is in no client
# channel's name, nor in a join/leave channel's ("#" + a channel's name).
COMMANDS = "!commands"

log = logging.getLogger("fastfan.bus")


class Command(msgspec.Struct, forbid_unknown_fields=False):
    command: str
    user: str
    channel: str = ""


_decode_command = msgspec.json.Decoder(Command).decode


def encode_command(command: str, user: str, channel: str = "") -> bytes:
    return msgspec.json.encode(Command(command, user, channel))


def apply_command(hub: Hub, payload: bytes) -> None:
    """A command from the bus, applied to this worker's clients; one warning if it is not
    one of ours."""
    try:
        command = _decode_command(payload)
    except msgspec.DecodeError as exc:
        log.warning("bus: dropped a command that is not one: %s", exc)
        return
    if command.command == "disconnect" and command.user:
        hub.disconnect_user(command.user)
    elif (command.command == "unsubscribe" and command.user
          and is_valid_channel(command.channel)):
        hub.unsubscribe_user(command.user, command.channel)
    else:
        log.warning("bus: dropped an unknown command %r", command.command[:100])


class Bus(Protocol):
    @property
    def up(self) -> bool: ...
    @property
    def dropped_total(self) -> int: ...

    def publish(self, channel: str, payload: bytes, session: Any, request_id: bytes) -> int: ...
    def publish_history(self, channel: str, payload: bytes, session: Any,
                        request_id: bytes) -> int: ...
    def read_history(self, channel: str, since: int, limit: int,
                     answer: Callable[[HistoryAnswer | None], None]) -> None: ...
    def subscribe(self, channel: str) -> bool: ...
    def unsubscribe(self, channel: str) -> None: ...
    def command(self, payload: bytes, session: Any) -> int: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
