"""Redis Cluster 7+ with sharded pub/sub: `--redis redis+cluster://host:port[,host:port...]`.

Channel C is on the master owning slot key_slot(prefix + C) (Redis Cluster's own slot,
see sharded.py): the worker SSUBSCRIBEs to it there and SPUBLISHes it there, so a
backend publishes with one `SPUBLISH prefix+C` through any cluster client. Per master,
a RedisBus in its `sharded` mode holds a publishing and a subscribing connection, as a
shard of ShardedBus does; the slot map is CLUSTER SLOTS from the first node that answers
(the URL's, then any the map named), and redis-py's cluster client carries presence,
whose keys are hash-tagged by the Redis channel (`{prefix+C}:presence`, fastfan.presence.redis):
in C's slot, with its pub/sub and history.

The map is read again every MAP_PERIOD, at once when a node answers MOVED or pushes a
`sunsubscribe` (the slot has gone elsewhere: resharding, or a failover), and every
MAP_PERIOD_DOWN while a master is unreachable, until its replica has taken over. Then
the channels whose master changed move: SUNSUBSCRIBE on the old one (when it still
answers), SSUBSCRIBE on the new one; and every slot that left a master takes publishes
again only SETTLE later (503), whether this worker subscribes to its channels or not, so
that every node has moved too. A publish is answered `published` only by the master this
worker is subscribed to, never retried elsewhere: acknowledged means delivered to the
nodes subscribed there, or 503.

History is on the channel's master too: its keys are hash-tagged by the Redis channel
(`{prefix+C}:history`, `{prefix+C}:epoch`, in C's slot), a publish is the numbering script
(EVALSHA, SPUBLISH) on the master's publishing connection, and a read is answered on a
reply channel in C's slot, which the worker SSUBSCRIBEs on the master's subscribing
connection for the read: behind every message of C before it, ahead of every one after
(fastfan.history.redis). A slot that moves (a failover, resharding) may have lost its last
writes on the way: the first script on the new master starts a new epoch.

`channels` and `info` (fastfan.directory.redis): the registry through the cluster client (its
keys in one slot), the query and reply channels SSUBSCRIBEd on their slots' masters by
every worker, like COMMANDS, and moved with their slots.

@app.on_message: sharded pub/sub has no pattern subscriptions, and Redis keeps no list of
the channels published to. So each node's first worker SSUBSCRIBEs the channels matching
the handlers' patterns that some client of the deployment subscribes to: its own at once
(they are subscribed anyway), every other worker's as the directory's `channels` answers
them, asked every TAP_PERIOD. It keeps them, as its clients' (moved with their slots,
subscribed again on a reconnect), while they have a subscriber somewhere, and taps every
message that comes on them: once per node, whoever published it (a client, the API,
app.publish, a bare SPUBLISH). A channel no client subscribes to is heard by no handler,
nor the first TAP_PERIOD of a channel subscribed on another worker (docs/hooks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from .._core import Outbox, is_valid_channel
from ..auth import ChannelPatterns
from ..directory import MAX_LISTED, Counts, Node, channel_counts
from ..directory.redis import RedisDirectory
from ..history import HistoryAnswer, new_epoch
from ..history.redis import RedisHistory
from ..webhooks.redis import RedisOccupancy
from .base import REFUSED, Acknowledger, BusHealth, HubLink, Presence, Transitions
from .commands import COMMANDS
from .gather import gathered
from .redis import CONNECT_TIMEOUT, RedisBus, Subscriber, _command
from .sharded import SETTLE, RoutedBus

log = logging.getLogger("fastfan.redis")

SCHEME = "redis+cluster://"
# How often the slot map is read while every master answers, and while one does not
# (a failover takes the cluster's node timeout and an election: seconds).
MAP_PERIOD = 5.0
MAP_PERIOD_DOWN = 0.25
# How often a node's first worker asks which channels the deployment's clients subscribe
# to, for @app.on_message: a channel subscribed on another worker is heard this much later.
TAP_PERIOD = 1.0


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], str]:
    """`redis+cluster://[user:password@]host:port[,host:port...]`: the startup nodes, and
    the `user:password@` (as given) every node's connections use."""
    rest = url[len(SCHEME):].split("/", 1)[0]
    credentials, _, hosts = rest.rpartition("@")
    nodes = []
    for host in hosts.split(","):
        name, _, port = host.strip().rpartition(":")
        nodes.append((name or "localhost", int(port or 6379)))
    return nodes, credentials + "@" if credentials else ""


class ClusterMaster(RedisBus):
    """One master of the cluster, in sharded pub/sub: SSUBSCRIBE and SPUBLISH, one channel
    per command (each may be in its own slot). A channel whose slot is not (or no longer)
    on this master is told to `moved`; history's reads are answered on a reply channel in
    the read channel's slot, subscribed for the read, and its epochs name this master."""

    PUBLISH = b"SPUBLISH"

    def __init__(self, hub: HubLink, url: str, prefix: str, presence_ttl: float,
                 predecessor: str, history_ttl: float, *, name: str,
                 owns: Callable[[str], bool], moved: Callable[[bytes], None],
                 presence_client: RedisCluster, directory: RedisDirectory | None,
                 tapped: set[str], taps: Callable[[bytes], str | None]) -> None:
        self.moved = moved
        # @app.on_message's (ClusterBus.tap_messages): the channels subscribed for it, and
        # which Redis channel's messages it sees (its name, else None)
        self.tapped = tapped
        self.taps = taps
        self._unsubscribing: dict[bytes, int] = {}  # SUNSUBSCRIBEs sent, not answered
        super().__init__(hub, url, prefix, presence_ttl, predecessor, history_ttl, name=name,
                         owns=owns, settle=SETTLE, presence_client=presence_client,
                         directory=directory)

    def _history(self, ttl: float) -> RedisHistory:
        where = urlsplit(self.url)
        return RedisHistory(self._client, self.prefix, self.hub.history_size, ttl,
                            self.prefix + b"!history:" + new_epoch().encode(), b"SPUBLISH",
                            node=f"{where.hostname}:{where.port}".encode(), listen=self._listen,
                            reader=self._reader)

    def _listen(self, reply: bytes, on: bool) -> bool:
        """SSUBSCRIBE (or leave) a reply channel of history reads."""
        if self._subscriber is None or not self._connected:
            return False
        self._subscriber.transport.write(_command(b"SSUBSCRIBE" if on else b"SUNSUBSCRIBE",
                                                  reply))
        return True

    def _standing_channels(self) -> list[bytes]:
        """COMMANDS, the directory's channels and those tapped for @app.on_message, where
        their slot is this master's."""
        standing = [COMMANDS, *(self.directory.names if self.directory is not None else ()),
                    *(name for name in self.tapped if name not in self.hub.channels)]
        return [self.prefix + name.encode() for name in standing
                if self.owns is None or self.owns(name)]

    def tap(self, channel: str, on: bool) -> None:
        """SSUBSCRIBE `channel` for @app.on_message, or leave it (unless this worker's
        clients hold it: then it is subscribed as theirs)."""
        if channel not in self.hub.channels:
            self._change(channel, on)

    def unsubscribe(self, channel: str) -> None:
        """The clients' last subscriber left: the channel stays while it is tapped here."""
        if channel not in self.tapped or self.owns is None or not self.owns(channel):
            super().unsubscribe(channel)

    async def start(self) -> None:
        if self.message_tap is not None:  # (given by the cluster before it starts us)
            self.pushes.divert = self._tapped_message
        await super().start()

    def _tapped_message(self, channel: bytes, payload: bytes) -> None:
        """A well-formed message Redis pushed, with @app.on_message's taps on this worker:
        to the subscribers here, and to the tap if its channel is tapped."""
        name = self.taps(channel)
        if name is None or name in self.hub.channels:  # its subscribers here
            self.pushes.deliver(channel, payload)
        if name is not None:
            self.message_tap(name, payload)  # type: ignore[misc]

    def _subscribe_command(self, channels: list[bytes]) -> bytes:
        return b"".join(_command(b"SSUBSCRIBE", channel) for channel in channels)

    def _unsubscribe_command(self, channels: list[bytes]) -> bytes:
        for channel in channels:
            self._unsubscribing[channel] = self._unsubscribing.get(channel, 0) + 1
        return b"".join(_command(b"SUNSUBSCRIBE", channel) for channel in channels)

    def _refused(self, error: Exception) -> None:
        if str(error).startswith(("MOVED", "ASK")):  # a slot went elsewhere: this publish
            self.moved(b"")                          # 503, and the map is read again
        else:
            super()._refused(error)

    def on_subscribed(self, channel: bytes) -> None:
        if self.history.is_reply(channel):
            self.history.subscribed(channel)
        else:
            super().on_subscribed(channel)

    def on_sunsubscribed(self, channel: bytes) -> None:
        """A SUNSUBSCRIBE answered, or the node telling us that the slot has left it."""
        if self.history.is_reply(channel):
            return  # (its slot moved: its reads fail by themselves, MOVED or no answer)
        count = self._unsubscribing.get(channel, 0)
        if count > 1:
            self._unsubscribing[channel] = count - 1
        elif count == 1:
            del self._unsubscribing[channel]
        else:
            self.moved(channel)

    def on_moved(self, error: str) -> None:
        """`MOVED <slot> <host:port>` to an SSUBSCRIBE or SUNSUBSCRIBE: those of the slot's
        channels waiting for an answer get none; the subscribes go to the slot's master."""
        slot = int(error.split()[1])
        self.history.moved(slot)
        for channel in [c for c in self._unsubscribing if key_slot(c) == slot]:
            del self._unsubscribing[channel]
        for channel in [c for c in self._unanswered if key_slot(c) == slot]:
            del self._unanswered[channel]
            self.moved(channel)
        self.moved(b"")

    async def _connect(self) -> Subscriber:
        self._unsubscribing = {}  # on the connection that is gone
        return await super()._connect()


class Nowhere:
    """The owner of a channel whose slot has no known master (before the first map, or a
    slot no master serves): its publishes answer 503; the map's next reading places it."""

    def publish(self, channel: str, payload: bytes, ack: Acknowledger | None,
                request_id: bytes, exclude: Outbox | None = None) -> int:
        return REFUSED

    def subscribe(self, channel: str) -> bool:
        return True  # confirmed once a master has it

    def tap(self, channel: str, on: bool) -> None:
        pass  # subscribed once a master has it

    def unsubscribe(self, channel: str) -> None:
        pass

    def gather_presence(self, channel: str, answer: Callable[[Presence | None], None]) -> None:
        answer(None)

    def joined(self, channel: str, client_id: bytes, user: str, info: str,
               metadata: str = "") -> None:
        pass  # written by the owner's next refresh

    def left(self, channel: str, client_id: bytes) -> None:
        pass

    def publish_history(self, channel: str, payload: bytes, ack: Acknowledger | None,
                        request_id: bytes, exclude: Outbox | None = None) -> int:
        return REFUSED

    def read_history(self, channel: str, since: int, limit: int,
                     answer: Callable[[HistoryAnswer | None], None]) -> None:
        answer(None)


NOWHERE = Nowhere()


class ClusterBus(RoutedBus):
    def __init__(self, hub: HubLink, url: str, prefix: str, presence_ttl: float = 60.0,
                 predecessor: str = "", history_ttl: float = 300.0,
                 node: Node | None = None, worker: int = 0) -> None:
        self.hub = hub
        self.prefix = prefix.encode()
        self._prefix = prefix
        self._presence_ttl = presence_ttl
        self._history_ttl = history_ttl
        self._predecessor = predecessor  # given to the first master's bus only
        nodes, self._credentials = cluster_nodes(url)
        credentials = self._credentials[:-1]
        user, _, password = credentials.partition(":") if ":" in credentials else ("", "", "")
        self._login = {"username": unquote(user) or None, "password": unquote(password) or None,
                       "socket_connect_timeout": CONNECT_TIMEOUT}
        self._startup = nodes  # asked for the map first, then every node the map named
        self._known: list[tuple[str, int]] = []
        # redis-py's cluster client, for presence (keys of every slot); made once the map
        # is known: one made while no node answers keeps failing after they do
        self.client: RedisCluster | None = None
        # `channels` and `info` across the nodes (fastfan.directory.redis), through that client
        # and every master's connections; made with it
        self.directory: RedisDirectory | None = None
        self._node, self._worker = node, worker
        self.masters: dict[str, ClusterMaster] = {}  # "host:port" -> its bus
        self.owners: list[str] = []  # slot -> "host:port" of its master ("" for none)
        self.shards: list[ClusterMaster] = []
        self._stale = asyncio.Event()  # read the map now
        self._lost: set[str] = set()  # channels a node pushed a sunsubscribe for
        self._tasks: list[asyncio.Task[None]] = []
        self._retired = [0, 0]  # dropped_total, invalid_total of masters no longer ours
        # slot moved to another master (or a channel of it lost) -> settled at; and when
        # the last of them settles
        self._moving: dict[int, float] = {}
        self._settled_at = 0.0
        self._unmapped = False  # the last reading of the map failed (logged once)
        # @app.on_message (tap_messages): its patterns, and the channels subscribed for it
        self._tap_patterns: list[str] = []
        self._matches: Callable[[str], bool] = lambda channel: False
        self.tapped: set[str] = set()

    def shard(self, channel: str) -> Any:
        if not self.owners:
            return NOWHERE
        return self.masters.get(self.owners[key_slot(self.prefix + channel.encode())],
                                NOWHERE)

    @property
    def up(self) -> bool:
        """Every slot has a master, and every master's bus is up."""
        return (bool(self.owners) and "" not in self.owners
                and all(bus.up for bus in self.masters.values()))

    def publish(self, channel: str, payload: bytes, ack: Acknowledger | None,
                request_id: bytes, exclude: Outbox | None = None) -> int:
        """On the channel's master, but 503 for SETTLE after the channel moved to another
        master: the other nodes follow it there meanwhile."""
        if self._moving and self._still_moving(channel):
            return REFUSED
        return super().publish(channel, payload, ack, request_id, exclude)

    def publish_history(self, channel: str, payload: bytes, ack: Acknowledger | None,
                        request_id: bytes, exclude: Outbox | None = None) -> int:
        """Through the numbering script on the channel's master, as `publish`."""
        if self._moving and self._still_moving(channel):
            return REFUSED
        return super().publish_history(channel, payload, ack, request_id, exclude)

    def gather_channels(self, pattern: str | None, limit: int, local: Counts,
                        answer: Callable[[Counts | None], None]) -> None:
        if self.directory is None:
            answer(None)  # no slot map yet
        else:
            self.directory.gather_channels(pattern, limit, local, answer)

    async def nodes(self) -> list[dict[str, Any]]:
        if self.directory is None:
            raise ConnectionError("redis cluster: no slot map yet")
        return await self.directory.nodes()

    def _still_moving(self, channel: str) -> bool:
        now = asyncio.get_running_loop().time()
        if now >= self._settled_at:
            self._moving.clear()
            return False
        return self._moving.get(key_slot(self.prefix + channel.encode()), 0.0) > now

    def health(self) -> BusHealth:
        """Up while every slot has a master and every master's bus is up; `down` names
        what is missing."""
        if not self.owners:
            missing = ["redis cluster (no slot map yet)"]
        else:
            missing = (["redis cluster (slots without a master)"] if "" in self.owners
                       else []) + [bus.name for bus in self.shards if not bus.up]
        return BusHealth(up=self.up,
                         down=("redis down: " + ", ".join(missing),) if missing else (),
                         dropped=self._retired[0] + sum(bus.dropped_total for bus in self.shards),
                         invalid=self._retired[1] + sum(bus.invalid_total for bus in self.shards))

    def watch_transitions(self, listener: Transitions) -> None:
        """Decided in the cluster, its keys in one slot, through the cluster's client once
        the slot map is known (edges wait for it)."""
        self.occupancy = RedisOccupancy(None, self._prefix, self._presence_ttl, listener)

    async def start(self) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self._keep_mapped()))
        if self.message_tap is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._keep_tapping()))
        if self.occupancy is not None:
            self.occupancy.start()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.occupancy is not None:
            await self.occupancy.stop()
        if self.directory is not None:
            await self.directory.withdraw()
        for bus in self.masters.values():
            await bus.stop()
        if self.client is not None:
            await self.client.aclose()

    def moved(self, channel: bytes) -> None:
        """A node said that a slot is no longer its own: read the map again."""
        if channel:
            self._lost.add(channel[len(self.prefix):].decode("ascii"))
        self._stale.set()

    async def _keep_mapped(self) -> None:
        while True:
            owners = await self._read_map()
            if owners is not None:
                self._follow(owners)
            period = MAP_PERIOD if self.up else MAP_PERIOD_DOWN
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stale.wait(), period)
            self._stale.clear()

    async def _read_map(self) -> list[str] | None:
        """CLUSTER SLOTS from the first node that answers: slot -> "host:port" of its
        master ("" for a slot no master serves); None when no node answers."""
        failure = ""
        for host, port in dict.fromkeys([*self._startup, *self._known]):
            node = aioredis.Redis(host=host, port=port, socket_timeout=CONNECT_TIMEOUT,
                                  retry=Retry(NoBackoff(), 0),  # the next node, at once
                                  **self._login)  # type: ignore[arg-type]
            try:
                spans = await node.execute_command(  # type: ignore[no-untyped-call]
                    "CLUSTER", "SLOTS")
            except (aioredis.RedisError, OSError) as exc:
                failure = f"{host}:{port}: {exc}"
                continue
            finally:
                await node.aclose()
            if not spans:
                failure = f"{host}:{port} serves no slot (a cluster being made?)"
                continue
            owners = [""] * REDIS_CLUSTER_HASH_SLOTS
            known = []
            for start, end, *members in spans:
                for member in members:  # the master first, then its replicas
                    known.append((member[0].decode() or host, int(member[1])))
                master = f"{members[0][0].decode() or host}:{members[0][1]}"
                owners[start:end + 1] = [master] * (end + 1 - start)
            self._known = known
            if self._unmapped:
                log.info("redis cluster: slot map read from %s:%d", host, port)
            self._unmapped = False
            return owners
        if not self._unmapped:
            log.warning("redis cluster: no node answers for the slot map (%s)", failure)
        self._unmapped = True
        return None

    # @app.on_message ------------------------------------------------------------------

    def tap_messages(self, patterns: list[str], tap: Callable[[str, bytes], None]) -> None:
        """Each node's first worker: the channels matching `patterns` that clients of the
        deployment subscribe to (see the module's docstring)."""
        if self._worker == 0:
            self.message_tap = tap
            self._tap_patterns = patterns
            self._matches = ChannelPatterns(patterns).allows
            log.info("@app.on_message on a Redis Cluster hears the matching channels that "
                     "some client subscribes to, not the others (docs/hooks.md)")

    def _taps(self, channel: bytes) -> str | None:
        """A Redis channel's name when it is a client channel the handlers' patterns match."""
        name = channel[len(self.prefix):].decode("ascii", errors="replace")
        return name if is_valid_channel(name) and self._matches(name) else None

    async def _keep_tapping(self) -> None:
        while True:
            await asyncio.sleep(TAP_PERIOD)
            subscribed = await self._subscribed_anywhere()
            if subscribed is None:
                continue  # a worker did not answer: the channels tapped stay as they are
            for channel in subscribed - self.tapped:
                self.tapped.add(channel)
                self.shard(channel).tap(channel, True)
            for channel in self.tapped - subscribed:
                self.tapped.discard(channel)
                self.shard(channel).tap(channel, False)

    async def _subscribed_anywhere(self) -> set[str] | None:
        """The channels matching the patterns that have a subscriber on some worker; None
        when the directory cannot tell."""
        directory = self.directory
        if directory is None:
            return None
        subscribed: set[str] = set()
        for pattern in self._tap_patterns:
            counts: Counts | None = await gathered(functools.partial(
                directory.gather_channels, pattern, MAX_LISTED,
                channel_counts(self.hub.subscriber_counts(), pattern)))
            if counts is None:
                return None
            subscribed.update(name for name, count in counts if count)
        return subscribed

    def _follow(self, owners: list[str]) -> None:
        """The channels whose master changed move to the new one."""
        if self.client is None:
            self.client = RedisCluster(
                startup_nodes=[ClusterNode(*name.rsplit(":", 1)) for name in set(owners) if name],
                require_full_coverage=False, **self._login)  # type: ignore[arg-type]
            if self._node is not None:
                self.directory = RedisDirectory(
                    self.client, self.hub, self._prefix, self._node, self._worker,
                    send=lambda channel, payload: self.publish(channel, payload, None, b""))
                self._tasks.append(asyncio.get_running_loop().create_task(
                    self.directory.announce_forever()))
            if self.occupancy is not None:
                self.occupancy.use(self.client)
        if owners == self.owners and not self._lost:
            return
        channels = list(dict.fromkeys([
            *self.hub.channels, COMMANDS, *self.tapped,
            *(self.directory.names if self.directory is not None else ())]))
        before = {channel: self.shard(channel) for channel in channels}
        # Every slot that leaves a master settles, whether or not a channel of it is
        # subscribed here: the nodes subscribed to one follow it meanwhile.
        self._settled_at = asyncio.get_running_loop().time() + SETTLE
        for slot, (was, new) in enumerate(zip(self.owners, owners, strict=False)):
            if was and was != new:
                self._moving[slot] = self._settled_at
        self.owners = owners
        for name in set(owners) - set(self.masters) - {""}:
            self._add(name)
        for channel in channels:
            now = self.shard(channel)
            if now is not before[channel] or channel in self._lost:
                before[channel].unsubscribe(channel)
                now.subscribe(channel)
                if before[channel] is not NOWHERE:  # others may publish there already
                    self._moving[key_slot(self.prefix + channel.encode())] = self._settled_at
        self._lost.clear()
        for name in set(self.masters) - set(owners):
            bus = self.masters.pop(name)
            self.shards.remove(bus)
            self._retired[0] += bus.dropped_total  # counters do not go backwards
            self._retired[1] += bus.invalid_total
            asyncio.get_running_loop().create_task(bus.stop())
            log.info("redis cluster: %s is no longer a master", name)

    def _add(self, name: str) -> None:
        predecessor, self._predecessor = self._predecessor, ""
        assert self.client is not None  # made with the first map, before any master
        bus = ClusterMaster(self.hub, f"redis://{self._credentials}{name}/0", self._prefix,
                            self._presence_ttl, predecessor, self._history_ttl,
                            name=f"redis master {name}",
                            owns=lambda channel: self.owners[key_slot(
                                self.prefix + channel.encode())] == name,
                            moved=self.moved, presence_client=self.client,
                            directory=self.directory, tapped=self.tapped, taps=self._taps)
        bus.message_tap = self.message_tap
        self.masters[name] = bus
        self.shards.append(bus)
        asyncio.get_running_loop().create_task(bus.start())
        log.info("redis cluster: master %s", name)
