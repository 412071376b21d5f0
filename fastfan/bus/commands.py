"""Server API commands (`disconnect`, `unsubscribe`), carried by the bus to every worker of
every node, each of which applies them to its own clients."""

from __future__ import annotations

import logging

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


_decode_command = msgspec.json.Decoder(Command).decode


def encode_command(command: str, user: str, channel: str = "") -> bytes:
    return msgspec.json.encode(Command(command, user, channel))


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
    else:
        log.warning("bus: dropped an unknown command %r", command.command[:100])
