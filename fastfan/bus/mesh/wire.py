"""The embedded bus's wire format: its records, declared once.

A record is a header (HEADER: the length of what follows the length field, the kind, the
channel's length), a channel name, and a body whose layout its kind says. Every bound a
receiver checks before it trusts a length is here too.
"""

from __future__ import annotations

import struct
from enum import IntEnum

import msgspec

from ...auth import MAX_TOKEN_LENGTH


class Kind(IntEnum):
    """The kinds of record. Worker to worker, on the asker's outgoing connection: HELLO (the
    channel is the sender's worker index, the body when it started: STARTED), PUBLISH,
    SUBSCRIBE, UNSUBSCRIBE, PRESENCE and CHANNELS (queries: a query number, then for
    CHANNELS a limit and the pattern), COMMAND (a server API command, bus.commands' JSON, no
    channel), SEQUENCE (a publish for the channel's owner to number: token, flags, message),
    PUBLISH_EXCLUDING (a numbered message back to its publisher's worker: token, message),
    HISTORY (a read: query, since, limit), PRESENT (on a join/leave channel the receiver
    began to watch: the sender's subscribers of its channel, in parts, each a flag byte,
    FIRST_PART on the first, and JSON [[clientId, user, info]...]), OCCUPANCY (with
    webhooks: an edge of the sender's holdings, fastfan.webhooks.occupancy: flags, then
    the user of a member). Answers, back on the same connection: SUBSCRIBED, PRESENCE_ANSWER and
    CHANNELS_ANSWER (query, JSON), SEQUENCED (token, offset, sent back, then the epoch; an
    offset of 0 is a refusal: the owner's store is full), HISTORY_ANSWER (query, JSON)."""

    HELLO = 1
    PUBLISH = 2
    SUBSCRIBE = 3
    UNSUBSCRIBE = 4
    SUBSCRIBED = 5
    PRESENCE = 6
    PRESENCE_ANSWER = 7
    COMMAND = 8
    SEQUENCE = 9
    SEQUENCED = 10
    PUBLISH_EXCLUDING = 11
    HISTORY = 12
    HISTORY_ANSWER = 13
    CHANNELS = 14
    CHANNELS_ANSWER = 15
    PRESENT = 16
    OCCUPANCY = 17


TOKEN = struct.Struct("!I")
STARTED = struct.Struct("!d")  # a HELLO's body: when its worker started, time.time()
SEQUENCED_ANSWER = struct.Struct("!IqB")  # token, offset, sent back (then epoch)
READ = struct.Struct("!Iqi")  # query, since, limit
MAX_READ_LIMIT = (1 << 31) - 1  # READ's limit (a --history-size may be larger)
NO_ECHO = 1  # SEQUENCE's flag: the publisher is not to receive its message
# OCCUPANCY's flags: the holding starts (else it stops); it is a member (the user follows);
# it is part of what the sender held when it connected (news only if the sender is the
# younger worker)
HOLDS, MEMBER, ALREADY = 1, 2, 4
# A SEQUENCED record: its header, a channel and an epoch.
MAX_SEQUENCED = 2 + 255 + SEQUENCED_ANSWER.size + 64
# What a record of each history kind carries at least, after its channel.
MIN_BODY = {Kind.SEQUENCE: TOKEN.size + 1, Kind.PUBLISH_EXCLUDING: TOKEN.size,
            Kind.HISTORY: READ.size, Kind.HISTORY_ANSWER: TOKEN.size, Kind.PRESENT: 1,
            Kind.OCCUPANCY: 1}
FIRST_PART = 1  # PRESENT's flag: what the receiver knew of that channel is replaced
# A PRESENT part holds entries until it passes this many bytes: one entry more is at most
# a token's user and info, so a part stays within the smallest record a worker takes.
PRESENT_PART_BYTES = 4096
LIMIT = struct.Struct("!I")
# A SUBSCRIBED record (the answer to a SUBSCRIBE, back on the same connection) is no
# longer than its header and a channel name.
MAX_ANSWER = 2 + 255
# A PRESENCE_ANSWER is a worker's Presence part of one channel: its count, a 16-character
# key per distinct user, and at most --presence-limit entries of at most PRESENCE_ENTRY
# bytes (the user and info come from one token): MeshBus.max_presence_answer, this bound
# plus the entries, admits any. A CHANNELS_ANSWER too: a worker lists at most
# directory.MAX_LISTED channels, about 54 MB at most.
MAX_PRESENCE_ANSWER = 64 << 20
PRESENCE_ENTRY = 2 * MAX_TOKEN_LENGTH
QUERY = struct.Struct("!I")
# length of what follows the length field, record kind, channel length
HEADER = struct.Struct("!IBB")
# The largest PUBLISH a worker sends is a `message` whose `data` came in a client message
# of at most --max-message-size bytes, wrapped in its envelope (type, channel of up to
# 255 bytes, from, timestamp: under 400 bytes) behind the channel again. Anything longer
# than --max-message-size plus this generous margin comes from no fastfan worker.
ENVELOPE_MARGIN = 4096
# The largest COMMAND: its JSON around a user's name (the API refuses one longer than a
# token, auth.MAX_TOKEN_LENGTH) and a channel's: whatever --max-message-size is.
MAX_COMMAND = 16 * 1024


def record(kind: Kind, channel: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(2 + len(channel) + len(payload), kind, len(channel)) + channel + payload


class JoinOrLeave(msgspec.Struct):
    class Data(msgspec.Struct):
        clientId: str  # noqa: N815 - the wire's name

    type: str
    data: Data


def join_or_leave(event: bytes) -> tuple[str, str]:
    """A join or leave event's type and clientId (msgspec.DecodeError if it is neither)."""
    decoded = _decode_join_or_leave(event)
    return decoded.type, decoded.data.clientId


_decode_join_or_leave = msgspec.json.Decoder(JoinOrLeave).decode
encode = msgspec.json.encode
decode_present = msgspec.json.Decoder(list[tuple[str, str, str]]).decode
decode_presence = msgspec.json.Decoder(tuple[int, list[str], list[list[str]]]).decode
decode_counts = msgspec.json.Decoder(list[tuple[str, int]]).decode
decode_history = msgspec.json.Decoder(tuple[int, str, list[tuple[int, msgspec.Raw]]]).decode
