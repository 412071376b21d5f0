"""The server API's `channels` and `info` across every node that shares a Redis.

A registry of the workers: every worker writes its node's description (the `info` entry,
fastfan.directory.Node) every ANNOUNCE_PERIOD into the hash `{prefix}!nodes` under its own
id (`name/worker index`, the name being host:port), and the time into the sorted set
`{prefix}!nodes:seen`. A reader first drops the ids not seen for STALE_AFTER (a node that
died without a word), then reads the hash, in one script. `info` lists one entry per
node name. A worker that stops removes its id; both keys expire if every node is gone.
The registry holds one small entry per worker, whatever the clients do.

An entry also says the node's --history-size (`historySize`, not part of `info`): every
node on one Redis must keep the same history, or one node's messages carry offsets and
another's none (or are kept fewer). Worker 0 of each node reads the registry after each
write and logs one warning per node and size that differs from its own, naming both: a
node that starts with another size says so at once, and the nodes already running say so
too. A warning, not a refusal: a rolling restart that changes --history-size passes
through such a mix (docs/protocol.md, History and recovery).

`channels`: the asking worker reads the live ids from the registry, then PUBLISHes a query
`{"query":N,"from":ID,"pattern":P,"limit":L}` on `{prefix}!directory`, which every worker
subscribes to; each other worker PUBLISHes its part `{"query":N,"from":ID,"channels":
[[C,n]…]}` (at most MAX_LISTED channels) on `{prefix}!directory:ASKER`, the asker's reply
channel. The asker answers once every live id has answered, or fails (503) after
GATHER_TIMEOUT: the few seconds after a node died without a word, until it counts as
stale, `channels` answers 503. Parts of a query nobody waits for are dropped.

On a Redis Cluster (cluster.py) the two registry keys share one hash tag, so one slot,
and go through redis-py's cluster client; the query channel and each worker's reply
channel are shard channels like any other, SPUBLISHed on their slot's master, where every
worker SSUBSCRIBEs to them (and follows them when their slot moves): one master carries
the queries, not every node of the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from ..bus.base import HubLink
from ..bus.gather import Gatherings
from . import GATHER_TIMEOUT, MAX_LISTED, Counts, Node, channel_counts

log = logging.getLogger("fastfan.redis")

# How often a worker writes its entry, and how long an entry not written again counts.
ANNOUNCE_PERIOD = 1.0
STALE_AFTER = 3.0
# How long a stopping worker tries to withdraw (Redis may be down).
WITHDRAW_TIMEOUT = 1.0
# Both registry keys expire this long after the last write of any worker.
REGISTRY_TTL = 60
# Where queries travel, after --redis-prefix; "!" is in no client channel's name.
QUERIES = "!directory"
# KEYS: the hash, the sorted set; ARGV: the time before which an entry is stale.
LIVE_ENTRIES = """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])) do
  redis.call('HDEL', KEYS[1], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""


class Query(msgspec.Struct, forbid_unknown_fields=False):
    query: int
    sender: str = msgspec.field(name="from")
    pattern: str = "*"
    limit: int = MAX_LISTED


class Part(msgspec.Struct, forbid_unknown_fields=False):
    query: int
    sender: str = msgspec.field(name="from")
    channels: Counts = msgspec.field(default_factory=list)


class Description(msgspec.Struct, forbid_unknown_fields=False):
    name: str
    workers: int
    connections: int
    subscriptions: int
    uptime: int


class Keeps(msgspec.Struct, forbid_unknown_fields=False):
    """What a registry entry says of the node's history (None: a node that does not say)."""

    name: str
    history_size: int | None = msgspec.field(name="historySize", default=None)


_decode_query = msgspec.json.Decoder(Query).decode
_decode_part = msgspec.json.Decoder(Part).decode
_decode_description = msgspec.json.Decoder(Description).decode
_decode_keeps = msgspec.json.Decoder(Keeps).decode
_encode = msgspec.json.encode


class RedisDirectory:
    def __init__(self, client: aioredis.Redis | RedisCluster, hub: HubLink, prefix: str,
                 node: Node, worker: int, *, send: Callable[[str, bytes], object]) -> None:
        self.client = client
        self.hub = hub
        self.node = node
        self.id = f"{node.name}/{worker}"
        self.compares_history = worker == 0  # one warning per node, not one per worker
        self._differing: set[tuple[str, int]] = set()  # (node, its size) warned of
        self.send = send  # (channel after the prefix, payload): a PUBLISH through the bus
        self.keys = [f"{{{prefix}nodes}}", f"{{{prefix}nodes}}:seen"]
        self.reply_channel = f"{QUERIES}:{self.id}"
        self.names = (QUERIES, self.reply_channel)  # to subscribe to from the start
        self.queries = (prefix + QUERIES).encode()
        self.replies = (prefix + self.reply_channel).encode()
        self.channels = (self.queries, self.replies)  # the same, as Redis channels
        self._live = client.register_script(LIVE_ENTRIES)
        self._gatherings = Gatherings(GATHER_TIMEOUT)

    # The registry ----------------------------------------------------------------------

    async def announce_forever(self) -> None:
        while True:
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(self.keys[0], self.id, _encode(
                {**self.node.describe(), "historySize": self.hub.history_size}))
            pipe.zadd(self.keys[1], {self.id: time.time()})
            for key in self.keys:
                pipe.expire(key, REGISTRY_TTL)
            with contextlib.suppress(aioredis.RedisError, OSError):  # ConnectionError too
                await pipe.execute()
                if self.compares_history:
                    self._compare_history(await self._live_entries())
            await asyncio.sleep(ANNOUNCE_PERIOD)

    def _compare_history(self, entries: dict[str, bytes]) -> None:
        """One warning for each live node (and size) whose --history-size is not ours."""
        ours = self.hub.history_size
        for entry in entries.values():
            try:
                keeps = _decode_keeps(entry)
            except msgspec.DecodeError:
                continue  # not written by fastfan
            theirs = keeps.history_size
            if (theirs is None or theirs == ours or keeps.name == self.node.name
                    or (keeps.name, theirs) in self._differing):
                continue
            self._differing.add((keeps.name, theirs))
            log.warning("history: node %s runs with --history-size %d, this node (%s) with "
                        "--history-size %d: every node on one Redis needs the same (whether "
                        "a message carries an offset and is kept for recovery depends on the "
                        "node it was published through)", keeps.name, theirs, self.node.name,
                        ours)

    async def withdraw(self) -> None:
        """This worker stops: out of the registry now, not STALE_AFTER later."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hdel(self.keys[0], self.id)
        pipe.zrem(self.keys[1], self.id)
        with contextlib.suppress(aioredis.RedisError, OSError, TimeoutError):
            await asyncio.wait_for(pipe.execute(), WITHDRAW_TIMEOUT)

    async def _live_entries(self) -> dict[str, bytes]:
        """Every live worker's entry, by its id; ConnectionError when Redis does not answer."""
        try:
            flat = await self._live(keys=self.keys, args=[time.time() - STALE_AFTER])
        except (aioredis.RedisError, OSError) as exc:
            raise ConnectionError(f"redis: {exc}") from exc
        return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}

    async def nodes(self) -> list[dict[str, Any]]:
        """`info`: one entry per live node, this one described afresh; by name."""
        described: dict[str, dict[str, Any]] = {}
        for entry in (await self._live_entries()).values():
            try:
                description = _decode_description(entry)
            except msgspec.DecodeError:
                continue  # not written by fastfan
            described[description.name] = msgspec.structs.asdict(description)
        described[self.node.name] = self.node.describe()
        return [described[name] for name in sorted(described)]

    # Channels ----------------------------------------------------------------------------

    def gather_channels(self, pattern: str | None, limit: int, local: Counts,
                        answer: Callable[[Counts | None], None]) -> None:
        """`answer(pairs)`: ours and every live worker's; None if one does not answer."""
        asyncio.get_running_loop().create_task(self._gather(pattern, limit, local, answer))

    async def _gather(self, pattern: str | None, limit: int, local: Counts,
                      answer: Callable[[Counts | None], None]) -> None:
        try:
            live = set(await self._live_entries()) - {self.id}
        except ConnectionError:
            answer(None)
            return

        def ask_each(query: int) -> set[str]:
            if live:
                self.send(QUERIES, _encode(Query(query, self.id, pattern or "*", limit)))
            return live

        self._gatherings.ask(local, answer, ask_each)

    def received(self, channel: bytes, payload: bytes) -> None:
        """A query from another worker (answered with our part), or a part for us."""
        try:
            if channel == self.queries:
                asked = _decode_query(payload)
                if asked.sender != self.id:
                    counts = channel_counts(self.hub.subscriber_counts(), asked.pattern,
                                            max(0, min(asked.limit, MAX_LISTED)))
                    self.send(f"{QUERIES}:{asked.sender}",
                              _encode(Part(asked.query, self.id, counts)))
                return
            part = _decode_part(payload)
        except msgspec.DecodeError as exc:
            log.warning("directory: dropped a message that is not ours: %s", exc)
            return
        self._gatherings.part(part.query, part.sender, part.channels)
