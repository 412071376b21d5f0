"""The client → server messages, as msgspec decodes them.

`data` and `id` are kept as `msgspec.Raw`: the exact bytes the client sent, so a published
`data` is forwarded byte for byte and an `id` is echoed exactly, never decoded and
re-encoded. An absent field is an empty Raw. Unknown fields are ignored, so clients may
send more than this server knows.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from .history import MAX_POSITION

NO_VALUE = msgspec.Raw(b"")
# An offset, `since` or `limit`: past a signed 64-bit integer, the message is invalid (400)
# before any store sees it.
Position = Annotated[int, msgspec.Meta(le=MAX_POSITION)]


class Recover(msgspec.Struct, forbid_unknown_fields=False):
    """subscribe's `recover`: the last message the client has of the channel."""

    offset: Position
    epoch: str


class Request(msgspec.Struct):
    type: str
    channel: str | None = None
    data: msgspec.Raw = NO_VALUE
    id: msgspec.Raw = NO_VALUE
    echo: bool = True  # publish: false = not to the publishing connection itself
    token: str | None = None  # refresh: the new token
    # subscribe: also receive join and leave of the channel's other clients
    join_leave: bool = msgspec.field(name="joinLeave", default=False)
    # subscribe on a channel with history: resume after this position
    recover: Recover | None = None
    # history: how many messages, after which offset, of which epoch
    limit: Position | None = None
    since: Position | None = None
    epoch: str | None = None
    # rpc: the App's method to call (with `data`)
    method: str | None = None


decode_request = msgspec.json.Decoder(Request).decode
encode_json = msgspec.json.encode
