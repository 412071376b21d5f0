"""Channels sharded over several standalone Redis: `--redis URL1,URL2,...`.

A channel lives on shard `key_slot(prefix + channel) mod N` (N URLs, in the order given):
`key_slot` is Redis Cluster's hash slot, CRC16/XMODEM of the key (or of its `{hash tag}`)
mod 16384, redis-py's `redis.crc.key_slot`. Its pub/sub, presence and history are on that
shard, and a backend publishes there with one PUBLISH. A join/leave channel ("#" + name)
is a name like any other, hashed the same way. Server API commands are published on the
shard of COMMANDS ("!commands") and every worker subscribes to COMMANDS on every shard, so
a backend may publish a command to any one shard.

Each shard is a RedisBus with its two connections per worker, up and down on its own: a
shard that goes away fails only its channels (503 for their publishes) and subscribes to
them again when it returns, taking their publishes again SETTLE later. The bus is `up`
(and /ready 200) only while every shard is; `health().down` names those that are not.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from redis.crc import key_slot

from .._core import WATCH_PREFIX, Outbox
from ..directory import Counts, Node
from ..history import HistoryAnswer
from ..webhooks.redis import RedisOccupancy
from .base import Acknowledger, Bus, BusHealth, HubLink, Presence, Transitions
from .commands import COMMANDS
from .redis import RedisBus, reconnect_delay, redis_figures

# A shard back after an outage takes publishes again only once every node has had time
# to subscribe to it again: the longest wait between two reconnect attempts, and a margin.
# Without it a publish acknowledged by the first node back missed the subscribers of the
# last (2 to 9 of 4000 in test_nothing_acknowledged_is_lost_while_a_shard_restarts).
SETTLE = reconnect_delay(1 << 30) + 0.5


def shard_of(prefix: bytes, channel: str, shards: int) -> int:
    """Which of `shards` Redis holds `channel` (see the module's docstring)."""
    return key_slot(prefix + channel.encode()) % shards


def redis_urls(value: str) -> list[str]:
    """`--redis`'s comma-separated URLs."""
    return [url.strip() for url in value.split(",") if url.strip()]


def where(url: str) -> str:
    """host:port of a Redis URL, without its credentials: for logs and /ready."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


class RoutedBus(Bus):
    """A bus over several Redis, each channel on one of them: its `shard`, which carries
    its publishes, its subscription, its presence and its history."""

    prefix: bytes
    shards: Sequence[RedisBus]  # every Redis it holds a bus on
    # with webhooks: the transitions, decided in one Redis (its subclass's choice)
    occupancy: RedisOccupancy | None = None

    @abstractmethod
    def shard(self, channel: str) -> Any:
        """The RedisBus that holds `channel` (or one that refuses everything)."""

    def publish(self, channel: str, payload: bytes, ack: Acknowledger | None,
                request_id: bytes, exclude: Outbox | None = None) -> int:
        return int(self.shard(channel).publish(channel, payload, ack, request_id, exclude))

    def publish_history(self, channel: str, payload: bytes, ack: Acknowledger | None,
                        request_id: bytes, exclude: Outbox | None = None) -> int:
        """Through the numbering script on the channel's shard (its stream, and the read's
        answer on the connection that carries the channel's messages: the seam
        RedisHistory needs)."""
        return int(self.shard(channel).publish_history(channel, payload, ack, request_id,
                                                       exclude))

    def read_history(self, channel: str, since: int, limit: int,
                     answer: Callable[[HistoryAnswer | None], None]) -> None:
        self.shard(channel).read_history(channel, since, limit, answer)

    def command(self, payload: bytes, ack: Acknowledger | None) -> int:
        return self.publish(COMMANDS, payload, ack, b"")

    def _announce(self, channel: str, event: bytes) -> None:
        """A leave found by presence's expiry, for the watchers of `channel`, which may be
        on another shard than `channel` itself."""
        self.publish(WATCH_PREFIX + channel, event, None, b"")

    def subscribe(self, channel: str) -> bool:
        if self.occupancy is not None:
            self.occupancy.local.subscribed(channel)
        return bool(self.shard(channel).subscribe(channel))

    def unsubscribe(self, channel: str) -> None:
        if self.occupancy is not None:
            self.occupancy.local.unsubscribed(channel)
        self.shard(channel).unsubscribe(channel)

    def joined(self, channel: str, client_id: bytes, user: str, info: str,
               metadata: str = "") -> None:
        if self.occupancy is not None:
            self.occupancy.local.joined(channel, client_id, user)
        self.shard(channel).joined(channel, client_id, user, info, metadata)

    def left(self, channel: str, client_id: bytes) -> None:
        if self.occupancy is not None:
            self.occupancy.local.left(channel, client_id)
        self.shard(channel).left(channel, client_id)

    def gather_presence(self, channel: str, answer: Callable[[Presence | None], None]) -> None:
        self.shard(channel).gather_presence(channel, answer)

    def figures(self) -> dict[str, float]:
        down = sum(not shard.up for shard in self.shards)  # (Redis that are its parts)
        return {**redis_figures(self.health()), "redis_shards_down": float(down)}


class ShardedBus(RoutedBus):
    def __init__(self, hub: HubLink, urls: list[str], prefix: str, presence_ttl: float = 60.0,
                 predecessor: str = "", history_ttl: float = 300.0,
                 node: Node | None = None, worker: int = 0) -> None:
        self.prefix = prefix.encode()
        # The registry of nodes and the channel queries (fastfan.directory.redis) on the
        # first shard.
        self.shards = [RedisBus(hub, url, prefix, presence_ttl, predecessor, history_ttl,
                                name=f"redis shard {index} ({where(url)})",
                                owns=self._owner(index, len(urls)), settle=SETTLE,
                                node=node if index == 0 else None, worker=worker)
                       for index, url in enumerate(urls)]
        for shard in self.shards:
            shard.presence.announce = self._announce  # "#" + channel may be elsewhere

    def _owner(self, index: int, shards: int) -> Callable[[str], bool]:
        return lambda channel: shard_of(self.prefix, channel, shards) == index

    def tap_messages(self, patterns: list[str], tap: Callable[[str, bytes], None]) -> None:
        """A pattern spans the shards: each one's."""
        for shard in self.shards:
            shard.tap_messages(patterns, tap)

    def shard(self, channel: str) -> RedisBus:
        return self.shards[shard_of(self.prefix, channel, len(self.shards))]

    def health(self) -> BusHealth:
        """Up while every shard is; `down` names those that are not."""
        return BusHealth(up=all(shard.up for shard in self.shards),
                         dropped=sum(shard.dropped_total for shard in self.shards),
                         invalid=sum(shard.invalid_total for shard in self.shards),
                         down=tuple(f"shard {index} down ({where(shard.url)})"
                                    for index, shard in enumerate(self.shards)
                                    if not shard.up))

    def watch_transitions(self, listener: Transitions) -> None:
        """Decided in the first shard, as the node registry is."""
        self.occupancy = self.shards[0].occupancy_for(listener)

    async def start(self) -> None:
        for shard in self.shards:
            await shard.start()
        if self.occupancy is not None:
            self.occupancy.start()

    async def stop(self) -> None:
        if self.occupancy is not None:
            await self.occupancy.stop()
        for shard in self.shards:
            await shard.stop()

    def gather_channels(self, pattern: str | None, limit: int, local: Counts,
                        answer: Callable[[Counts | None], None]) -> None:
        self.shards[0].gather_channels(pattern, limit, local, answer)

    async def nodes(self) -> list[dict[str, Any]]:
        return await self.shards[0].nodes()
