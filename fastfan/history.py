"""History: the last messages of a channel, numbered, for clients that come back.

On a channel with history (`--history-size` > 0 and a name matching `--history-channels`)
every message is numbered by one sequencer per channel: `offset` 1, 2, 3... within an
`epoch`, a name for one unbroken run of the channel's history. Where the sequencer is:

- embedded bus: one worker owns each channel (`owner_of`: a hash of its name over the
  workers) and keeps its history in a `HistoryStore`, in memory; every publish on the
  channel, from any worker, goes through the owner, which numbers it, keeps it and sends it
  on. A worker that dies loses its channels' history: its successor starts new epochs.
- Redis: a stream and a small hash per channel, and a script that numbers, keeps and
  publishes a message in one atomic step (fastfan.bus.redis_history).

A message is numbered by appending `,"offset":N,"epoch":"E"` before its closing brace
(`with_position`); nothing else of it changes.
"""

from __future__ import annotations

import secrets
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

# A channel's offset and epoch are kept this long after its last message, even when its
# messages have expired (--history-ttl): a client that comes back later is still told
# `recovered:true` if it missed nothing. Past it the channel starts a new epoch.
META_TTL = 24 * 3600.0


class HistoryAnswer(NamedTuple):
    """A read of a channel's history: its last offset, its epoch, and the kept messages
    asked for, oldest first, as (offset, message) pairs."""

    top: int
    epoch: str
    messages: list[tuple[int, bytes]]


def new_epoch() -> str:
    return secrets.token_hex(4)


def position(offset: int, epoch: str) -> bytes:
    """What a numbered message and a `published` or `subscribed` reply carry."""
    return b',"offset":%d,"epoch":"%s"' % (offset, epoch.encode("ascii"))


def with_position(message: bytes, offset: int, epoch: str) -> bytes:
    """`message` (a JSON object) numbered: the position before its closing brace."""
    return message[:-1] + position(offset, epoch) + b"}"


def owner_of(channel: str, workers: int) -> int:
    """The worker (slot) that sequences `channel` on the embedded bus."""
    return zlib.crc32(channel.encode("ascii")) % workers


def select(messages: deque[tuple[int, float, bytes]] | list[tuple[int, float, bytes]],
           since: int, limit: int) -> list[tuple[int, bytes]]:
    """The `limit` oldest messages after offset `since`, or with `since` < 0 the `limit`
    newest: a history request's choice."""
    if limit <= 0:
        return []
    if since < 0:
        chosen = list(messages)[-limit:]
    else:
        chosen = [entry for entry in messages if entry[0] > since][:limit]
    return [(offset, message) for offset, _, message in chosen]


@dataclass
class ChannelHistory:
    epoch: str
    top: int = 0
    # (offset, time kept, message), oldest first
    messages: deque[tuple[int, float, bytes]] = field(default_factory=deque)
    touched: float = 0.0


class HistoryStore:
    """The embedded bus's sequencer and store: in memory, for the channels this worker
    owns. Each message is held once (the bytes every subscriber received)."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self.channels: dict[str, ChannelHistory] = {}
        self.kept_bytes = 0

    def _channel(self, name: str, now: float) -> ChannelHistory:
        history = self.channels.get(name)
        if history is None:
            history = self.channels[name] = ChannelHistory(new_epoch())
        history.touched = now
        return history

    def _expire(self, history: ChannelHistory, now: float) -> None:
        messages = history.messages
        while messages and (len(messages) > self.size or messages[0][1] <= now - self.ttl):
            self.kept_bytes -= len(messages.popleft()[2])

    def sequence(self, channel: str, message: bytes) -> tuple[int, str, bytes]:
        """Number `message`, keep it, and return its offset, epoch and numbered bytes."""
        now = time.monotonic()
        history = self._channel(channel, now)
        history.top += 1
        numbered = with_position(message, history.top, history.epoch)
        history.messages.append((history.top, now, numbered))
        self.kept_bytes += len(numbered)
        self._expire(history, now)
        return history.top, history.epoch, numbered

    def read(self, channel: str, since: int, limit: int) -> HistoryAnswer:
        now = time.monotonic()
        history = self._channel(channel, now)
        self._expire(history, now)
        return HistoryAnswer(history.top, history.epoch,
                             select(history.messages, since, limit))

    def sweep(self) -> None:
        """Forget what has expired: messages past the TTL, channels untouched for
        META_TTL (their next message starts a new epoch)."""
        now = time.monotonic()
        for name, history in list(self.channels.items()):
            self._expire(history, now)
            if not history.messages and history.touched <= now - META_TTL:
                del self.channels[name]
