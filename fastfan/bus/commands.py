"""Server API commands (`disconnect`, `unsubscribe`), carried by the bus to every worker of
every node, each of which applies them to its own clients. A protocol beside fastfan's
(fastfan.pusher) adds its own commands to EXTENSIONS."""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

from .._core import is_valid_channel
from .base import HubLink

# Where commands travel between nodes (Redis: --redis-prefix + this): "!" is in no client
# channel's name, nor in a join/leave channel's ("#" + a channel's name).
COMMANDS = "!commands"

log = logging.getLogger("fastfan.bus")


class Command(msgspec.Struct, forbid_unknown_fields=False):
    command: str
    user: str
    channel: str = ""
    data: str = ""  # an extension's payload


_decode_command = msgspec.json.Decoder(Command).decode

# Commands of other protocols, by name: the worker's handler of each (one hub per process).
EXTENSIONS: dict[str, Callable[[Command], None]] = {}


def encode_command(command: str, user: str, channel: str = "", data: str = "") -> bytes:
    return msgspec.json.encode(Command(command, user, channel, data))


def apply_command(hub: HubLink, payload: bytes) -> None:
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
    elif command.command in EXTENSIONS:
        EXTENSIONS[command.command](command)
    else:
        log.warning("bus: dropped an unknown command %r", command.command[:100])
