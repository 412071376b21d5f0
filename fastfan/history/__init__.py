"""History: the last messages of a channel, numbered, for clients that come back.

On a channel with history (`--history-size` > 0 and a name matching `--history-channels`)
every message is numbered by one sequencer per channel: `offset` 1, 2, 3... within an
`epoch`, a name for one unbroken run of the channel's history. Where the sequencer is:

- embedded bus: one worker owns each channel (`owner_of`: a hash of its name over the
  workers) and keeps its history in a `HistoryStore`, in memory; every publish on the
  channel, from any worker, goes through the owner, which numbers it, keeps it and sends it
  on. A worker that dies loses its channels' history: its successor starts new epochs.
- Redis: a stream and a small hash per channel, and a script that numbers, keeps and
  publishes a message in one atomic step (fastfan.history.redis).

A message is numbered by appending `,"offset":N,"epoch":"E"` before its closing brace
(`with_position`); nothing else of it changes.

A read of a channel that has no history creates nothing: it answers offset 0 and the epoch
the channel's first message will start (`first_epoch`: derived from the channel's name, a
`base` that the store's loss changes, and the day, so that it needs no storing), and a
client subscribed from there recovers everything once the channel has messages. A run
lost and started again takes another epoch: a new store or base, or a later day (a
channel's history is forgotten only after META_TTL untouched).

What history keeps is bounded: per worker by `--history-max-bytes` (a publish that would
pass it is refused, HistoryFullError: no channel's history is dropped for it), and an answer by
ANSWER_MAX_BYTES (a client pages forward with `since` for the rest).
"""

from __future__ import annotations

import hashlib
import secrets
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ..namespaces import NamespaceTable

# A channel's offset and epoch are kept this long after its last message, even when its
# messages have expired (--history-ttl): a client that comes back later is still told
# `recovered:true` if it missed nothing. Past it the channel starts a new epoch.
META_TTL = 24 * 3600.0

# --history-max-bytes's default: what one worker's history store keeps at most.
DEFAULT_MAX_BYTES = 64 << 20
# What a channel costs a store besides its messages' bytes (its name, its entry, its
# deque), counted against --history-max-bytes.
CHANNEL_COST = 256
# One connection may add to history this many bytes a second per publish its
# --publish-rate allows (each message counted as its size, as inflated, plus CHANNEL_COST),
# in bursts of twice a second's worth: a compressed message that inflates to 64 KiB costs
# what 64 small ones do.
BYTES_PER_PUBLISH = 1024
# `history` requests per second per connection, in bursts of twice that.
READ_RATE = 10.0
# A history answer carries at most this many bytes of messages (at least one message):
# the rest is paged with `since`. At most READS_IN_FLIGHT reads per worker wait for their
# answer at a time (with Redis their answers, READS_IN_FLIGHT x ANSWER_MAX_BYTES, must fit
# in the subscribing connection's output buffer beside the channels' messages: Redis
# closes it past 32 MiB by default); up to READS_QUEUED more wait their turn, the next
# are refused (503).
ANSWER_MAX_BYTES = 512 << 10  # half of --max-buffer's default, as a recovery may take
READS_IN_FLIGHT = 16
READS_QUEUED = 10_000
# The largest `offset`, `since` or `limit` a client may send: a signed 64-bit integer, as
# the embedded bus and Redis number them.
MAX_POSITION = (1 << 63) - 1


class HistoryFullError(Exception):
    """A publish refused: keeping it would pass --history-max-bytes."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"history full: this server keeps at most {max_bytes} bytes of "
                         "history (--history-max-bytes); the message was not published")


class HistoryAnswer(NamedTuple):
    """A read of a channel's history: its last offset, its epoch, and the kept messages
    asked for, oldest first, as (offset, message) pairs."""

    top: int
    epoch: str
    messages: list[tuple[int, bytes]]


def new_epoch() -> str:
    return secrets.token_hex(4)


def first_epoch(base: str, channel: str, now: float) -> str:
    """The epoch of `channel`'s first run started at `now` by a store whose `base` is given:
    what a read answers before that run exists, without storing anything."""
    day = int(now // META_TTL)
    return hashlib.sha1(f"{base}:{channel}:{day}".encode()).hexdigest()[:8]


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
    newest: a history request's choice; cut to ANSWER_MAX_BYTES (the oldest first kept
    after `since`, the newest without it), never below one message."""
    if limit <= 0:
        return []
    if since < 0:
        chosen = list(messages)[-limit:]
        chosen.reverse()
    else:
        chosen = [entry for entry in messages if entry[0] > since][:limit]
    taken: list[tuple[int, bytes]] = []
    size = 0
    for offset, _, message in chosen:
        size += len(message)
        if taken and size > ANSWER_MAX_BYTES:
            break
        taken.append((offset, message))
    if since < 0:
        taken.reverse()
    return taken


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

    def __init__(self, size: int, ttl: float, max_bytes: int = DEFAULT_MAX_BYTES,
                 limits: NamespaceTable | None = None) -> None:
        self.size = size
        self.ttl = ttl
        self.limits = limits  # each channel's size and TTL, while namespaces are active
        self.max_bytes = max_bytes
        self.channels: dict[str, ChannelHistory] = {}
        self.kept_bytes = 0  # the messages' and the channels' (CHANNEL_COST each)
        self.base = new_epoch()  # this store's: a worker's successor answers other epochs
        self._swept_when_full = 0.0

    def _channel(self, name: str, now: float) -> ChannelHistory:
        history = self.channels.get(name)
        if history is None:
            history = self.channels[name] = ChannelHistory(first_epoch(self.base, name, now))
            self.kept_bytes += CHANNEL_COST
        history.touched = now
        return history

    def _limits(self, channel: str) -> tuple[int, float]:
        """What `channel` keeps: messages, seconds (its namespace's, if it has one)."""
        if self.limits is None or not self.limits.active:
            return self.size, self.ttl
        return self.limits.history_limits(channel)

    def _room_for(self, channel: str, size: int, now: float, kept: int) -> bool:
        """Whether `size` more bytes on `channel` stay within max_bytes: counting what the
        channel's own size limit (`kept` messages) drops for them and, once a second,
        what has expired."""
        history = self.channels.get(channel)
        if history is None:
            size += CHANNEL_COST
        elif len(history.messages) >= kept:
            size -= len(history.messages[0][2])
        if self.kept_bytes + size <= self.max_bytes:
            return True
        if now - self._swept_when_full < 1.0:
            return False
        self._swept_when_full = now
        self.sweep()
        return self.kept_bytes + size <= self.max_bytes

    def _expire(self, history: ChannelHistory, now: float, limits: tuple[int, float]) -> None:
        messages = history.messages
        size, ttl = limits
        while messages and (len(messages) > size or messages[0][1] <= now - ttl):
            self.kept_bytes -= len(messages.popleft()[2])

    def sequence(self, channel: str, message: bytes) -> tuple[int, str, bytes]:
        """Number `message`, keep it, and return its offset, epoch and numbered bytes;
        HistoryFullError if keeping it would pass max_bytes."""
        now = time.monotonic()
        limits = self._limits(channel)
        if not self._room_for(channel, len(message) + 64, now, limits[0]):  # 64: its position
            raise HistoryFullError(self.max_bytes)
        history = self._channel(channel, now)
        history.top += 1
        numbered = with_position(message, history.top, history.epoch)
        history.messages.append((history.top, now, numbered))
        self.kept_bytes += len(numbered)
        self._expire(history, now, limits)
        return history.top, history.epoch, numbered

    def read(self, channel: str, since: int, limit: int) -> HistoryAnswer:
        """The channel's position and kept messages; of a channel without history, offset 0
        and the epoch its first message will start, creating nothing."""
        now = time.monotonic()
        history = self.channels.get(channel)
        if history is None:
            return HistoryAnswer(0, first_epoch(self.base, channel, now), [])
        history.touched = now
        self._expire(history, now, self._limits(channel))
        return HistoryAnswer(history.top, history.epoch,
                             select(history.messages, since, limit))

    def sweep(self) -> None:
        """Forget what has expired: messages past the TTL, channels untouched for
        META_TTL (their next message starts a new epoch)."""
        now = time.monotonic()
        for name, history in list(self.channels.items()):
            self._expire(history, now, self._limits(name))
            if not history.messages and history.touched <= now - META_TTL:
                del self.channels[name]
                self.kept_bytes -= CHANNEL_COST


class ReadLimiter:
    """A worker's history reads that wait for an answer: at most READS_IN_FLIGHT out at a
    time, READS_QUEUED more waiting their turn, and the next refused. Each read started
    calls `done` once, when its answer came or it failed."""

    def __init__(self) -> None:
        self.out = 0
        self.waiting: deque[Callable[[], None]] = deque()
        self._starting = False

    def submit(self, start: Callable[[], None], refuse: Callable[[], None]) -> None:
        if self.out < READS_IN_FLIGHT:
            self.out += 1
            start()
        elif len(self.waiting) < READS_QUEUED:
            self.waiting.append(start)
        else:
            refuse()

    def done(self) -> None:
        self.out -= 1
        if self._starting:
            return  # a read that failed as it started: the loop below goes on
        self._starting = True
        try:
            while self.waiting and self.out < READS_IN_FLIGHT:
                self.out += 1
                self.waiting.popleft()()
        finally:
            self._starting = False
