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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis

from ..history import META_TTL, HistoryAnswer, new_epoch

log = logging.getLogger("fastfan.redis")

# KEYS: stream, hash. ARGV: the Redis channel, the message without its closing brace, the
# size, the TTL, the hash's TTL, an epoch for a channel that has none, the publishing
# command. Returns {offset, epoch}.
# A channel's epoch, or a new one from the ARGV named, with an empty history (a hash lost
# while its stream lived, or never made: the stream's IDs start again at 1). Both scripts
# begin with it.
EPOCH = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[%d]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
  redis.call('EXPIRE', KEYS[2], ARGV[%d])
end
"""

PUBLISH_HISTORY = EPOCH % (6, 5) + """
local offset = redis.call('HINCRBY', KEYS[2], 'offset', 1)
local message = ARGV[2] .. ',"offset":' .. offset .. ',"epoch":"' .. epoch .. '"}'
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], offset .. '-0',
           't', redis.call('TIME')[1], 'm', message)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call(ARGV[7], ARGV[1], message)
return {offset, epoch}
"""

# KEYS: stream, hash. ARGV: since (-1: the newest), limit, an epoch for a channel that has
# none, the hash's TTL, the TTL, the reply channel, the query, the publishing command.
# Forgets the expired messages, then publishes {"query","top","epoch","messages":[[offset,
# message]...]} to the reply channel.
READ_HISTORY = EPOCH % (3, 4) + """
local top = redis.call('HGET', KEYS[2], 'offset')
local cutoff = tonumber(redis.call('TIME')[1]) - tonumber(ARGV[5])
while true do
  local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #head == 0 or tonumber(head[1][2][2]) > cutoff then break end
  redis.call('XDEL', KEYS[1], head[1][1])
end
local limit = tonumber(ARGV[2])
local entries = {}
if limit > 0 and tonumber(ARGV[1]) >= 0 then
  entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1] .. '-0', '+', 'COUNT', limit)
elseif limit > 0 then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', limit)
  for i = #newest, 1, -1 do table.insert(entries, newest[i]) end
end
local parts = {}
for i, entry in ipairs(entries) do
  parts[i] = '[' .. string.match(entry[1], '^%d+') .. ',' .. entry[2][4] .. ']'
end
redis.call(ARGV[8], ARGV[6], '{"query":' .. ARGV[7] .. ',"top":' .. top .. ',"epoch":"' ..
           epoch .. '","messages":[' .. table.concat(parts, ',') .. ']}')
return 1
"""

# A read Redis has not answered in this long fails (503, try again).
READ_TIMEOUT = 5.0


class Answer(msgspec.Struct):
    query: int
    top: int
    epoch: str
    messages: list[tuple[int, msgspec.Raw]]


_decode_answer = msgspec.json.Decoder(Answer).decode


class RedisHistory:
    """One Redis's history: the scripts, and the reads waiting for their answer."""

    def __init__(self, client: aioredis.Redis, prefix: bytes, size: int, ttl: float,
                 reply_channel: bytes, publish_command: bytes = b"PUBLISH") -> None:
        self.client = client
        self.prefix = prefix
        self.size = size
        self.ttl = max(1, round(ttl))
        self.meta_ttl = max(self.ttl, round(META_TTL))
        self.reply_channel = reply_channel
        self.publish_command = publish_command
        self._publish = client.register_script(PUBLISH_HISTORY)
        self._read = client.register_script(READ_HISTORY)
        self._reads: dict[int, Callable[[HistoryAnswer | None], None]] = {}
        self._next_query = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def keys(self, redis_channel: bytes) -> list[bytes]:
        return [b"{%s}:history" % redis_channel, b"{%s}:epoch" % redis_channel]

    async def add_publish(self, pipe: aioredis.client.Pipeline, redis_channel: bytes,
                          payload: bytes) -> None:
        """Queue the numbering script for `payload` (a `message` object) in `pipe`: its
        result is [offset, epoch]."""
        await self._publish(keys=self.keys(redis_channel),
                      args=[redis_channel, payload[:-1], self.size, self.ttl, self.meta_ttl,
                            new_epoch(), self.publish_command], client=pipe)

    def read(self, channel: str, since: int, limit: int,
             answer: Callable[[HistoryAnswer | None], None]) -> None:
        self._next_query += 1
        query = self._next_query
        self._reads[query] = answer
        task = asyncio.get_running_loop().create_task(self._run_read(channel, since, limit,
                                                                     query))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_read(self, channel: str, since: int, limit: int, query: int) -> None:
        redis_channel = self.prefix + channel.encode()
        for attempt in range(2):
            try:
                await asyncio.wait_for(self._read(
                    keys=self.keys(redis_channel),
                    args=[since, limit, new_epoch(), self.meta_ttl, self.ttl,
                          self.reply_channel, query, self.publish_command]), READ_TIMEOUT)
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
        answer = self._reads.pop(query, None)
        if answer is not None:
            answer(None)

    def answered(self, payload: bytes) -> None:
        """A read's answer, from the reply channel."""
        try:
            decoded = _decode_answer(payload)
        except msgspec.DecodeError:
            log.warning("redis: dropped a history answer that is not one")
            return
        answer = self._reads.pop(decoded.query, None)
        if answer is not None:
            answer(HistoryAnswer(decoded.top, decoded.epoch,
                                 [(offset, bytes(raw)) for offset, raw in decoded.messages]))

    def fail_all(self) -> None:
        """The subscribing connection is gone: no answer will come on it."""
        reads, self._reads = self._reads, {}
        for answer in reads.values():
            answer(None)

    def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
