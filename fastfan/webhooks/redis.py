"""The deployment's transitions decided in Redis, for the nodes that share it (webhooks).

Each worker (an `id` of its own, new with each process) writes its edges (occupancy.py)
to Redis: per holding a set of the ids that hold it (`{prefix}webhooks:c:CHANNEL` for a
channel, `{prefix}webhooks:m:["CHANNEL","USER"]` for a member), and per id the set of
holdings it holds (`{prefix}webhooks:held:ID`). One script per loop turn applies the turn's
edges in order and answers which of them took a holding from nobody to someone or back:
Redis runs scripts one at a time, so exactly one worker learns of each transition, and it
tells its listener.

A worker that dies without a word: every worker writes the time into the sorted set
`{prefix}webhooks:alive` every TTL/3 and runs a script that withdraws the holdings of the
ids not seen for --presence-ttl; the worker whose script withdrew them tells what that
emptied. A worker that stops withdraws its own. A worker whose writes failed (Redis down),
or whose id was withdrawn while it lived (Redis thought it dead, or lost its data), writes
the differences between what it holds and what its held set says once Redis answers:
what that starts or stops is told as any edge is (so, after a Redis that lost its data,
its `occupied` come again).

Every key shares one hash tag, so a Redis Cluster keeps them on one node and the scripts
run there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis

from ..bus.base import Transitions
from .occupancy import Holding, LocalOccupancy, tell

log = logging.getLogger("fastfan.redis")

# KEYS: this id's held set, then one holding's set per edge; ARGV: the id, then "1" (holds)
# or "0" (stops) per edge. Answers the (1-based) edges that are transitions.
APPLY_EDGES = """
local transitions = {}
for i = 2, #KEYS do
  if ARGV[i] == '1' then
    if redis.call('SADD', KEYS[i], ARGV[1]) == 1 then
      redis.call('SADD', KEYS[1], KEYS[i])
      if redis.call('SCARD', KEYS[i]) == 1 then table.insert(transitions, i - 1) end
    end
  elseif redis.call('SREM', KEYS[i], ARGV[1]) == 1 then
    redis.call('SREM', KEYS[1], KEYS[i])
    if redis.call('SCARD', KEYS[i]) == 0 then table.insert(transitions, i - 1) end
  end
end
return transitions
"""
# KEYS: the alive set; ARGV: the time before which an id is gone, the held sets' prefix,
# and an id to withdraw whatever its time ("" for none). Answers the holdings emptied.
WITHDRAW_GONE = """
local emptied = {}
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if ARGV[3] ~= '' then table.insert(gone, ARGV[3]) end
for _, id in ipairs(gone) do
  local held = ARGV[2] .. id
  for _, key in ipairs(redis.call('SMEMBERS', held)) do
    if redis.call('SREM', key, id) == 1 and redis.call('SCARD', key) == 0 then
      table.insert(emptied, key)
    end
  end
  redis.call('DEL', held)
  redis.call('ZREM', KEYS[1], id)
end
return emptied
"""
# Edges per script run: a join storm is written in several, in order.
EDGES_PER_SCRIPT = 1000
# How long a stopping worker tries to withdraw its holdings (Redis may be down).
WITHDRAW_TIMEOUT = 1.0

_encode = msgspec.json.encode
_decode_member = msgspec.json.Decoder(tuple[str, str]).decode


class RedisOccupancy:
    def __init__(self, client: Any, prefix: str, ttl: float, listener: Transitions) -> None:
        self.client: Any = None  # and its scripts: None until a cluster's client is made
        self._apply_edges: Any = None
        self._withdraw_gone: Any = None
        self.ttl = ttl
        self.listener = listener
        self.id = secrets.token_hex(8)
        tag = f"{{{prefix}webhooks}}"
        self.channel_prefix, self.member_prefix = f"{tag}:c:", f"{tag}:m:"
        self.held_prefix = f"{tag}:held:"
        self.alive = f"{tag}:alive"
        self.local = LocalOccupancy(self._queue)
        self._edges: list[tuple[str, bool]] = []  # (holding's key, holds) until written
        self._queued = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._resync = False  # Redis may not hold what we do: write the differences
        self._failing = False  # Redis did not answer, until it does (logged once)
        if client is not None:
            self.use(client)

    def key(self, channel: str, user: str | None) -> str:
        if user is None:
            return self.channel_prefix + channel
        return self.member_prefix + _encode([channel, user]).decode()

    def holding(self, key: str) -> Holding:
        if key.startswith(self.channel_prefix):
            return key[len(self.channel_prefix):], None
        return _decode_member(key[len(self.member_prefix):])

    def _queue(self, channel: str, user: str | None, on: bool) -> None:
        self._edges.append((self.key(channel, user), on))
        self._queued.set()

    def use(self, client: Any) -> None:
        """The client made at last (a cluster's): the edges kept meanwhile go out."""
        self.client = client
        self._apply_edges = client.register_script(APPLY_EDGES)
        self._withdraw_gone = client.register_script(WITHDRAW_GONE)
        self._queued.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write_forever()),
                       loop.create_task(self._stay_alive())]

    async def stop(self) -> None:
        """Withdraw this worker's holdings: they are told now, not a TTL later."""
        for task in self._tasks:
            task.cancel()
        if self.client is None:
            return
        with contextlib.suppress(aioredis.RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._withdraw(self.id), WITHDRAW_TIMEOUT)

    async def _write_forever(self) -> None:
        """Each loop turn's edges, in order, in as few scripts as EDGES_PER_SCRIPT allows;
        after a failure, the differences between what we hold and what Redis says we do."""
        while True:
            await self._queued.wait()
            self._queued.clear()
            if self.client is None:
                continue  # kept until the client exists (use() wakes us)
            edges, self._edges = self._edges, []
            try:
                if self._resync:  # what we hold now includes the edges queued meanwhile
                    edges = await self._differences()
                    self._resync = False
                for start in range(0, len(edges), EDGES_PER_SCRIPT):
                    batch = edges[start:start + EDGES_PER_SCRIPT]
                    transitions = await self._apply_edges(
                        keys=[self.held_prefix + self.id, *(key for key, _ in batch)],
                        args=[self.id, *("1" if on else "0" for _, on in batch)])
                    for index in transitions:
                        key, on = batch[index - 1]
                        tell(self.listener, *self.holding(key), on)
            except (aioredis.RedisError, OSError) as exc:
                self._resync = True  # once Redis answers again (_stay_alive wakes us)
                self._unreachable(exc)

    async def _differences(self) -> list[tuple[str, bool]]:
        """The edges that make Redis hold for us what we hold: stops (members first), then
        starts (channels first)."""
        held = {key.decode() for key in await self.client.smembers(self.held_prefix + self.id)}
        here = {self.key(channel, user): user is None
                for channel, user in self.local.holdings()}
        stops = sorted(held - here.keys(), key=lambda key: key.startswith(self.channel_prefix))
        starts = sorted(here.keys() - held, key=lambda key: not here[key])
        return [(key, False) for key in stops] + [(key, True) for key in starts]

    async def _stay_alive(self) -> None:
        """Say we are alive; withdraw the ids that stopped saying so. If ours was withdrawn
        (Redis thought us dead, or lost its data), write what we hold again."""
        period = min(1.0, self.ttl / 3)
        while True:
            if self.client is not None:
                try:
                    if await self.client.zadd(self.alive, {self.id: time.time()}):
                        self._resync = True  # (the first time too: nothing to write then)
                    await self._withdraw("")
                    if self._resync:
                        self._queued.set()
                    if self._failing:
                        log.info("webhooks: Redis answers again")
                        self._failing = False
                except (aioredis.RedisError, OSError) as exc:
                    self._unreachable(exc)
            await asyncio.sleep(period)

    def _unreachable(self, exc: Exception) -> None:
        if not self._failing:
            log.warning("webhooks: cannot reach Redis (%s): who holds what is written again "
                        "once it answers", exc)
            self._failing = True

    async def _withdraw(self, id_: str) -> None:
        emptied = await self._withdraw_gone(
            keys=[self.alive], args=[time.time() - self.ttl, self.held_prefix, id_])
        holdings = sorted(map(self.holding, (key.decode() for key in emptied)),
                          key=lambda holding: holding[1] is None)
        for channel, user in holdings:
            tell(self.listener, channel, user, False)
