"""History in Redis: a stream and a hash per channel, numbered in one atomic step.

Per channel, under one hash tag (the Redis channel's own name, so that a cluster keeps them
on the node that serves the channel): `{<prefix><channel>}:history`, a stream of the kept
messages whose entry IDs are their offsets (`N-0`), each with its time (`t`) and the
numbered message (`m`); and `{<prefix><channel>}:epoch`, a hash of the channel's `epoch` and
last `offset`. PUBLISH_HISTORY numbers a message, appends it (trimmed to --history-size),
and publishes it, in one script: two nodes can never give two messages one offset, and
subscribers receive the channel's messages in offset order. A backend may call the same
script (docs/protocol.md shows how); a bare PUBLISH to a history channel reaches
subscribers without an offset and is not kept.

A read (READ_HISTORY) is answered by PUBLISHing the answer to this worker's reply channel,
to which its subscribing connection subscribes from the start: Redis writes that answer to
the connection behind every message of the channel published before the read, and ahead
of every one after it, which is the seam a subscription from a position needs
(Hub.subscribe_history). A Redis that comes back empty has lost the hash, so the channel's
next message or read starts a new epoch.

On a Redis Cluster the channel's messages come from its slot's master (SSUBSCRIBE), so the
answer must too, on the same connection: it is SPUBLISHed to a reply channel in the
channel's own slot, `{<prefix><channel>}!history:<worker>` (the hash tag is the whole Redis
channel: the slot of its keys and of the channel itself), which the worker SSUBSCRIBEs to
on that master before the read goes, and leaves once no read waits on it (`listen`). The
hash also names the master that wrote it (`node`): a script run on another one (its
replica took over, which may have missed the last writes, or the slot moved) starts a new
epoch, so that no client is told `recovered:true` across a loss.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import redis.asyncio as aioredis
from redis.crc import key_slot

from ..bus.resp import command
from . import ANSWER_MAX_BYTES, META_TTL, HistoryAnswer, ReadLimiter, new_epoch

if TYPE_CHECKING:
    from ..namespaces import NamespaceTable

log = logging.getLogger("fastfan.redis")

# Both scripts begin with the channel's epoch (KEYS: stream, hash, and the base of the
# epochs that start a channel: one per Redis, or per slot on a cluster). Its hash's; or,
# when the hash was written by another master than the one named (ARGV node), a new one
# (ARGV new) with an empty history (the stream's IDs start again at 1); or none (`false`):
# the channel has no history (never published, or lost). FIRST_EPOCH is the epoch its
# first message starts, the same until that message whatever reads it: a hash of the base
# (made once, from ARGV base), the channel (ARGV channel) and the day (history.first_epoch).
EPOCH = """
local function first_epoch()
  local base = redis.call('GET', KEYS[3])
  if not base then
    base = ARGV[{base}]
    redis.call('SET', KEYS[3], base)
  end
  local day = math.floor(tonumber(redis.call('TIME')[1]) / {day})
  return string.sub(redis.sha1hex(base .. ':' .. ARGV[{channel}] .. ':' .. day), 1, 8)
end
local function start(epoch)
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0, 'node', ARGV[{node}])
  redis.call('EXPIRE', KEYS[2], ARGV[{meta_ttl}])
  return epoch
end
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if epoch and ARGV[{node}] ~= '' and redis.call('HGET', KEYS[2], 'node') ~= ARGV[{node}] then
  epoch = start(ARGV[{new}])
end
"""

# ARGV: the Redis channel, the message without its closing brace, the size, the TTL, the
# hash's TTL, a new epoch, the publishing command, the master running it (or ''), a base.
# Returns {offset, epoch}.
PUBLISH_HISTORY = EPOCH.format(base=9, day=int(META_TTL), channel=1, node=8, meta_ttl=5,
                               new=6) + """
if not epoch then epoch = start(first_epoch()) end
local offset = redis.call('HINCRBY', KEYS[2], 'offset', 1)
local message = ARGV[2] .. ',"offset":' .. offset .. ',"epoch":"' .. epoch .. '"}'
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], offset .. '-0',
           't', redis.call('TIME')[1], 'm', message)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call(ARGV[7], ARGV[1], message)
return {offset, epoch}
"""

# ARGV: since (-1: the newest), limit, a new epoch, the hash's TTL, the TTL, the reply
# channel, the query, the publishing command, the master running it (or ''), a base, the
# Redis channel, the most bytes of messages to answer. Forgets the expired messages, then
# publishes {"query","top","epoch","messages":[[offset,message]...]} to the reply channel;
# creates nothing for a channel without history.
READ_HISTORY = EPOCH.format(base=10, day=int(META_TTL), channel=11, node=9, meta_ttl=4,
                            new=3) + """
local function answer(top, epoch, parts)
  redis.call(ARGV[8], ARGV[6], '{"query":' .. ARGV[7] .. ',"top":' .. top .. ',"epoch":"' ..
             epoch .. '","messages":[' .. table.concat(parts, ',') .. ']}')
  return 1
end
if not epoch then return answer(0, first_epoch(), {}) end
local top = redis.call('HGET', KEYS[2], 'offset')
local cutoff = tonumber(redis.call('TIME')[1]) - tonumber(ARGV[5])
while true do
  local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #head == 0 or tonumber(head[1][2][2]) > cutoff then break end
  redis.call('XDEL', KEYS[1], head[1][1])
end
local limit = tonumber(ARGV[2])
local most = tonumber(ARGV[12])
local parts, size = {}, 0
local function take(entry)
  size = size + #entry[2][4]
  if #parts > 0 and size > most then return false end
  table.insert(parts, '[' .. string.match(entry[1], '^%d+') .. ',' .. entry[2][4] .. ']')
  return true
end
if limit > 0 and tonumber(ARGV[1]) >= 0 then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '(' .. ARGV[1] .. '-0', '+',
                                    'COUNT', limit)) do
    if not take(entry) then break end
  end
elseif limit > 0 then
  for _, entry in ipairs(redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', limit)) do
    if not take(entry) then break end
  end
  local oldest_first = {}
  for i = #parts, 1, -1 do table.insert(oldest_first, parts[i]) end
  parts = oldest_first
end
return answer(top, epoch, parts)
"""

PUBLISH_HISTORY_SHA = hashlib.sha1(PUBLISH_HISTORY.encode()).hexdigest().encode()

# A read Redis has not answered in this long fails (503, try again).
READ_TIMEOUT = 5.0


@functools.cache
def _slot_tags() -> list[bytes]:
    """A hash tag in each of a cluster's 16384 slots (the shortest numbers that land
    there): where each slot's base of epochs is kept."""
    tags: list[bytes] = [b""] * 16384
    missing, number = 16384, 0
    while missing:
        tag = b"%d" % number
        slot = key_slot(tag)
        if not tags[slot]:
            tags[slot] = tag
            missing -= 1
        number += 1
    return tags


class Answer(msgspec.Struct):
    query: int
    top: int
    epoch: str
    messages: list[tuple[int, msgspec.Raw]]


_decode_answer = msgspec.json.Decoder(Answer).decode


@dataclass
class _Listening:
    """A cluster's reply channel: SSUBSCRIBEd while reads wait for their answer on it."""

    subscribed: bool = False  # the master confirmed it: the reads may go
    held: list[tuple[str, int, int, int]] = field(default_factory=list)  # until then
    queries: set[int] = field(default_factory=set)  # the reads answered here


class RedisHistory:
    """One Redis's history: the scripts, and the reads waiting for their answer.

    On a cluster's master: `node` names it in the epoch hashes it writes, and
    `listen(reply_channel, on)` SSUBSCRIBEs (or leaves) a reply channel on its subscribing
    connection (False: there is none now); each channel's reads are answered on a reply
    channel in its own slot, subscribed while they wait."""

    def __init__(self, client: aioredis.Redis, prefix: bytes, size: int, ttl: float,
                 reply_channel: bytes, publish_command: bytes = b"PUBLISH", *,
                 node: bytes = b"",
                 listen: Callable[[bytes, bool], bool] | None = None,
                 reader: aioredis.Redis | None = None) -> None:
        self.client = client
        # The reads' own connections (at most READS_IN_FLIGHT at a time, see ReadLimiter):
        # never one the publishing pipeline waits for.
        self.reader = reader or client
        self.prefix = prefix
        self.size = size
        self.ttl = max(1, round(ttl))
        self.meta_ttl = max(self.ttl, round(META_TTL))
        self.reply_channel = reply_channel
        self.suffix = reply_channel[len(prefix):]  # "!history:<worker>": every reply's end
        self.publish_command = publish_command
        # the script's ARGV 3 to 5 (size, TTL, the hash's TTL): the same for every publish
        # but on a channel of a namespace (`limits`, while namespaces are active)
        self._fixed_arguments = (b"%d" % size, b"%d" % self.ttl, b"%d" % self.meta_ttl)
        self.limits: NamespaceTable | None = None
        self.node = node
        self.listen = listen
        self._read = self.reader.register_script(READ_HISTORY)
        self._limiter = ReadLimiter()
        self._reads: dict[int, Callable[[HistoryAnswer | None], None]] = {}
        self._replies: dict[int, bytes] = {}  # query -> the cluster's reply channel for it
        self._listening: dict[bytes, _Listening] = {}
        self._next_query = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def keys(self, redis_channel: bytes) -> list[bytes]:
        """The channel's stream and hash, and the base of its first epochs (on a cluster,
        one per slot: a script's keys are all in the slot of the channel)."""
        base = self.prefix + b"!history-base"
        if self.listen is not None:
            base += b"{%s}" % _slot_tags()[key_slot(redis_channel)]
        return [b"{%s}:history" % redis_channel, b"{%s}:epoch" % redis_channel, base]

    def is_reply(self, redis_channel: bytes) -> bool:
        return redis_channel.endswith(self.suffix)

    def numbering_command(self, redis_channel: bytes, payload: bytes) -> bytes:
        """The numbering script for `payload` (a `message` object), as the publishing
        connection sends it (EVALSHA: the script is loaded on it, `load_parts`); its
        result is [offset, epoch]."""
        return command(b"EVALSHA", PUBLISH_HISTORY_SHA, b"3", *self.keys(redis_channel),
                       redis_channel, payload[:-1], *self._arguments(redis_channel),
                       new_epoch().encode(),
                       self.publish_command, self.node, new_epoch().encode())

    def _arguments(self, redis_channel: bytes) -> tuple[bytes, bytes, bytes]:
        """The numbering script's size, TTL and the hash's TTL for the channel."""
        if self.limits is None or not self.limits.active:
            return self._fixed_arguments
        size, ttl = self.limits.history_limits(redis_channel[len(self.prefix):].decode())
        seconds = max(1, round(ttl))
        return b"%d" % size, b"%d" % seconds, b"%d" % max(seconds, round(META_TTL))

    @staticmethod
    def load_parts() -> tuple[bytes, ...]:
        """SCRIPT LOAD of the numbering script: on each publishing connection as it is made
        (a Redis that restarted, or failed over, has forgotten it)."""
        return (b"SCRIPT", b"LOAD", PUBLISH_HISTORY.encode())

    def load_command(self) -> bytes:
        return command(*self.load_parts())

    def read(self, channel: str, since: int, limit: int,
             answer: Callable[[HistoryAnswer | None], None]) -> None:
        """Sent when fewer than READS_IN_FLIGHT wait for their answer, else queued (or
        refused: `answer(None)`)."""
        self._limiter.submit(functools.partial(self._begin, channel, since, limit, answer),
                             functools.partial(answer, None))

    def _begin(self, channel: str, since: int, limit: int,
               answer: Callable[[HistoryAnswer | None], None]) -> None:
        self._next_query += 1
        query = self._next_query
        if self.listen is None:
            self._reads[query] = answer
            self._start(channel, since, limit, query, self.reply_channel)
            return
        reply = b"{%s}%s" % (self.prefix + channel.encode(), self.suffix)
        listening = self._listening.get(reply)
        if listening is None:
            if not self.listen(reply, True):
                self._limiter.done()
                answer(None)
                return
            listening = self._listening[reply] = _Listening()
        self._reads[query] = answer
        self._replies[query] = reply
        listening.queries.add(query)
        if listening.subscribed:
            self._start(channel, since, limit, query, reply)
        else:
            listening.held.append((channel, since, limit, query))

    def subscribed(self, reply: bytes) -> None:
        """The master confirmed a reply channel: the reads that waited for it go."""
        listening = self._listening.get(reply)
        if listening is not None and not listening.subscribed:
            listening.subscribed = True
            for channel, since, limit, query in listening.held:
                self._start(channel, since, limit, query, reply)
            listening.held.clear()

    def moved(self, slot: int) -> None:
        """A reply channel's SSUBSCRIBE met MOVED: its reads get no answer here."""
        for reply in [r for r in self._listening if key_slot(r) == slot]:
            for query in self._listening.pop(reply).queries:
                self._replies.pop(query, None)
                self._fail(query)

    def _start(self, channel: str, since: int, limit: int, query: int, reply: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._run_read(channel, since, limit,
                                                                     query, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_read(self, channel: str, since: int, limit: int, query: int,
                        reply: bytes) -> None:
        redis_channel = self.prefix + channel.encode()
        _, ttl, meta_ttl = self._arguments(redis_channel)
        for attempt in range(2):
            try:
                await asyncio.wait_for(self._read(
                    keys=self.keys(redis_channel),
                    args=[since, limit, new_epoch(), meta_ttl, ttl, reply, query,
                          self.publish_command, self.node, new_epoch(), redis_channel,
                          ANSWER_MAX_BYTES]), READ_TIMEOUT)
                break
            except aioredis.ConnectionError:
                if attempt == 0:
                    continue  # a pooled connection from before Redis restarted: once more
                self._fail(query)
                return
            except (TimeoutError, aioredis.RedisError, OSError) as exc:
                log.warning("redis: history read of %s failed: %s", channel, exc)
                self._fail(query)
                return
        # Ran: its answer comes on the subscribing connection, unless that one is lost.
        asyncio.get_running_loop().call_later(READ_TIMEOUT, self._fail, query)

    def _fail(self, query: int) -> None:
        answer = self._done(query)
        if answer is not None:
            answer(None)

    def _done(self, query: int) -> Callable[[HistoryAnswer | None], None] | None:
        """The read's answer callback, if it still waits; a reply channel no read waits on
        any longer is left."""
        answer = self._reads.pop(query, None)
        if answer is not None:
            self._limiter.done()
        reply = self._replies.pop(query, None)
        if reply is not None and (listening := self._listening.get(reply)) is not None:
            listening.queries.discard(query)
            if not listening.queries and self.listen is not None:
                del self._listening[reply]
                self.listen(reply, False)
        return answer

    def answered(self, payload: bytes) -> None:
        """A read's answer, from a reply channel."""
        try:
            decoded = _decode_answer(payload)
        except msgspec.DecodeError:
            log.warning("redis: dropped a history answer that is not one")
            return
        answer = self._done(decoded.query)
        if answer is not None:
            answer(HistoryAnswer(decoded.top, decoded.epoch,
                                 [(offset, bytes(raw)) for offset, raw in decoded.messages]))

    def fail_all(self) -> None:
        """The subscribing connection is gone: no answer will come on it, nor on the
        reply channels it had."""
        reads, self._reads = self._reads, {}
        self._replies.clear()
        self._listening.clear()
        for answer in reads.values():
            self._limiter.done()
            answer(None)

    def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
