"""The Redis bus: nodes on many machines share channels through Redis pub/sub.

Each worker holds two connections of its own on uvloop, their replies parsed by
`hiredis.Reader`. Publishing (bus/resp.py): whatever was published during a loop turn is
written as one batch of PUBLISH commands at its end, without waiting for the answers to
the batch before (one connection: Redis keeps their order), and each answer acknowledges
its publish. Subscribing: each pushed message goes straight to `Hub.fanout`. (redis-py's
client serves presence, the directory and history's reads.)

The Redis channel is `--redis-prefix` + channel, and the payload is the `message` object
exactly as subscribers receive it, so any backend can `PUBLISH fastfan:news '{...}'`.
Server API commands (`disconnect`, `unsubscribe`) travel on `--redis-prefix` + COMMANDS
("!commands"), which every worker's subscribing connection subscribes to from the start;
whoever can PUBLISH to this Redis can disconnect clients, as it can already send them
anything.
A worker SUBSCRIBEs to a channel while it has local subscribers for it (bursts go out as
one command per loop turn), and after a reconnect (backoff min(attempt x 50 ms, 2 s))
subscribes to all of them again. Until Redis answers, publishes get 503 and /ready 503.

On a channel with history, a publish is the numbering script of fastfan.history.redis
(EVALSHA, loaded on the connection as it is made) instead of a PUBLISH, in the same batch,
and its result acknowledges the publisher with the position; reads are answered on this
worker's reply channel (`--redis-prefix` + "!history:" + a random name), which the
subscribing connection subscribes to from the start, like COMMANDS.
(On a cluster, on a reply channel in the read channel's slot, subscribed for the read.)

What waits for Redis is bounded: publishes queued or unanswered up to MAX_QUEUED_BYTES
(then 503, and /ready 503 until half of it drains), and publishes Redis leaves unanswered
for PIPELINE_TIMEOUT fail (503) and drop both connections, so that only a Redis that
answers again brings the bus back up. The subscribing connection PINGs every HEARTBEAT,
and is dropped likewise when the answer does not come. A publish Redis answers with an
error (maxmemory) fails alone. A publishing connection that is lost fails the publishes
it carried (not sent again: Redis may have run them) and is replaced at once; the
publishes made meanwhile wait for the new one.

Several Redis (bus/sharded.py) and Redis Cluster (bus/cluster.py) hold a RedisBus per
shard or master: `owns` says which channels are its own (subscribed again after a
reconnect, their presence refreshed), and `settle` keeps publishes at 503 a while after a
reconnect. A cluster's master speaks sharded pub/sub: cluster.ClusterMaster, a RedisBus
whose commands and replies are the sharded ones.

A payload from Redis that is not a JSON object in valid UTF-8 is dropped and counted:
subscribers receive it as a text frame, and a browser fails a connection whose text is not
UTF-8 (1007).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import msgspec
import redis.asyncio as aioredis

from .._core import WATCH_PREFIX, Outbox, is_valid_channel
from ..directory import Counts, Node
from ..directory.redis import RedisDirectory
from ..history import READS_IN_FLIGHT, HistoryAnswer, new_epoch, position
from ..history.redis import RedisHistory
from ..presence.redis import CHANGE, RedisPresence
from ..webhooks.redis import RedisOccupancy
from . import resp
from ._resp import Publishes, Pushes, publish_cost
from .base import Acknowledger, Bus, BusHealth, HubLink, Presence, Transitions
from .commands import COMMANDS, apply_command
from .resp import LOST, Pipeline

log = logging.getLogger("fastfan.redis")

# Bytes of publishes waiting for Redis, queued or in a pipeline it has not answered yet.
# Past this, publishes get 503 and /ready 503 rather than growing the worker: bounded by
# count alone (100,000), 5000 publishes of 60 KB to a stopped Redis held 322 MiB. A
# healthy Redis answers a pipeline in milliseconds, so only a Redis that has stopped
# keeping up fills 16 MiB; the pipeline's own copy of the bytes can double it, no more
# (at 32 MiB, 5,000 publishes of 60 KB to a stopped Redis grew a worker by ~64 MiB).
MAX_QUEUED_BYTES = 16 << 20
# Presence gathers out at once per worker (each one channel's, shared by the requests that
# come meanwhile, Hub.gather_presence): past it, presence answers 503 for a moment.
PRESENCE_READS = 8
# A pipeline Redis has not answered in this long means it is stalled (stopped, swapping, a
# long script), not slow: DEBUG SLEEP 2 in the tests is slow, and is waited for.
PIPELINE_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
# The subscribing connection sends a PING this often; one unanswered for PIPELINE_TIMEOUT
# drops it. Else a partition from Redis, with nothing to publish, went unnoticed: the
# worker kept its subscribers, who received nothing (tests/test_multihost.py).
HEARTBEAT = 1.0

_is_json_object = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode


def _publishing_client(url: str, **pool: Any) -> aioredis.Redis:
    """redis-py's client with its pool of connections (`pool`: its options), for the
    pipelines, presence, the directory and history (whose reads have one of their own).

    redis-py 8.1's asyncio pool hands out a connection that Redis has closed (a restart,
    CLIENT KILL, its idle `timeout`) instead of replacing it while maintenance
    notifications are on, as they are by default over RESP3 (redis-py #4252): its first
    command then fails. fastfan has no use for them (planned maintenance of a managed
    Redis), so they are off where the pool has them, and the pool checks again."""
    options: dict[str, Any] = {}
    if "maint_notifications_config" in inspect.signature(
            aioredis.ConnectionPool.__init__).parameters:
        from redis.maint_notifications import MaintNotificationsConfig
        options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return aioredis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT, **options,
                                   **pool)


_command = resp.command


def reconnect_delay(attempt: int) -> float:
    return min(attempt * 0.05, 2.0)


class Subscriber(asyncio.Protocol):
    """The subscribing connection: pushes in, parsed by hiredis, fanned out."""

    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus
        self.reader = hiredis.Reader()
        self.transport: Any = None
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()  # the PING after AUTH and SUBSCRIBE came back
        self.lost = loop.create_future()
        self.loop = loop
        self.answered = loop.time()  # when Redis last answered a PING
        # One per PING sent after the first (ready's), in order, as Redis answers them: the
        # future of one whose answer is awaited (ping), else None.
        self._pings: deque[asyncio.Future[None] | None] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        # messages (and Redis Cluster's smessages) in C; the rest in on_reply
        self.bus.pushes.take(self.reader, self.on_reply)

    def on_reply(self, reply: Any) -> None:
        """What Redis pushes or answers on this connection, but a message."""
        if isinstance(reply, list) and reply[0] == b"pmessage":
            self.bus.on_tapped(reply[2], reply[3])
        elif isinstance(reply, list) and reply[0] in (b"subscribe", b"ssubscribe"):
            self.bus.on_subscribed(reply[1])
        elif isinstance(reply, list) and reply[0] == b"sunsubscribe":
            self.bus.on_sunsubscribed(reply[1])
        elif reply == b"PONG" or (isinstance(reply, list) and reply[0] == b"pong"):
            # PING's answer: a list once subscribed to something, else a status
            self.answered = self.loop.time()
            if not self.ready.done():
                self.ready.set_result(None)
            elif (self._pings and (answer := self._pings.popleft()) is not None
                  and not answer.done()):
                answer.set_result(None)
        elif isinstance(reply, hiredis.ReplyError) and str(reply).startswith("MOVED"):
            self.bus.on_moved(str(reply))  # an SSUBSCRIBE to a node without the slot
        elif isinstance(reply, hiredis.ReplyError):
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(f"redis refused us: {reply}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection closed"))
        for answer in self._pings:
            if answer is not None and not answer.done():
                answer.set_exception(ConnectionError("connection closed"))
        self._pings.clear()
        if not self.lost.done():
            self.lost.set_result(None)

    def heartbeat(self) -> None:
        """A PING, answered in `answered`."""
        self.transport.write(_command(b"PING"))
        self._pings.append(None)

    def ping(self) -> asyncio.Future[None]:
        """A PING, whose answer the future awaits (not an earlier PING's)."""
        answer: asyncio.Future[None] = self.loop.create_future()
        if self.transport.is_closing():  # aborted, connection_lost still to come
            answer.set_exception(ConnectionError("connection closed"))
            return answer
        self.transport.write(_command(b"PING"))
        self._pings.append(answer)
        return answer


class RedisBus(Bus):
    PUBLISH = b"PUBLISH"  # (a Redis Cluster's master, cluster.ClusterMaster: SPUBLISH)

    def __init__(self, hub: HubLink, url: str, prefix: str, presence_ttl: float = 60.0,
                 predecessor: str = "", history_ttl: float = 300.0, *, name: str = "redis",
                 owns: Callable[[str], bool] | None = None, settle: float = 0.0,
                 presence_client: Any = None, node: Node | None = None,
                 worker: int = 0, directory: RedisDirectory | None = None) -> None:
        self.hub = hub
        self.url = url
        self.name = name             # in log lines: which Redis, when there are several
        self.owns = owns             # with several Redis: whether a channel is on this one
        # After a reconnect, publishes wait this long (503) for the other nodes to subscribe
        # again: Redis answers a PUBLISH that no node is subscribed to yet all the same.
        self.settle = settle
        self._settling: asyncio.TimerHandle | None = None
        self._ever_connected = False
        self.prefix = prefix.encode()
        self._commands = self.prefix + COMMANDS.encode()
        self.up = False              # connected and not full: publishes are taken
        self._connected = False      # both connections answer
        self._reported: bool | None = None  # the state last logged
        self.dropped_total = 0       # messages Redis could not take (lost in a failed batch)
        # redis-py's client, for presence and the directory (and history's reads, on a pool
        # of their own below); publishes go on a connection of our own (resp.Pipeline)
        self._client = _publishing_client(url)
        self._pipeline: Pipeline | None = None
        self._replacing: asyncio.Task[None] | None = None  # the pipeline, after it was lost
        self._refusals_logged_at = -60.0  # Redis's error replies to publishes: a line a minute
        self._unechoed: dict[bytes, Outbox] = {}
        # redis channel -> SUBSCRIBEs sent on this connection that Redis has not answered
        self._unanswered: dict[bytes, int] = {}
        self._subscriber: Subscriber | None = None
        self._changes: dict[bytes, bool] = {}  # channel -> subscribe (True) / unsubscribe
        self._changes_scheduled = False
        self._tasks: list[asyncio.Task[None]] = []
        # History's reads, and presence's, each on a pool of its own, which publishing never
        # waits for (5,000 reads on the shared pool once left a bystander's publishes 503).
        self._reader = _publishing_client(url, max_connections=READS_IN_FLIGHT)
        self._presence_reader = None if presence_client else _publishing_client(
            url, max_connections=PRESENCE_READS)
        self.presence = RedisPresence(presence_client or self._client, hub, prefix,
                                      presence_ttl,
                                      announce=self._announce, predecessor=predecessor,
                                      owns=owns, reader=self._presence_reader,
                                      send=None if presence_client else self._schedule_send)
        self.history = self._history(history_ttl)
        self.history.limits = hub.namespace_table
        # What runs per message, compiled (bus/_resp.pyx): publishes queued, encoded and
        # answered; messages Redis pushes, checked and fanned out
        self._publishes = Publishes(hub, self.prefix, self.PUBLISH, MAX_QUEUED_BYTES,
                                    self._unechoed, self.history, self._call_send,
                                    self._overflowed, self._room)
        self.pushes = Pushes(hub, self.prefix, self._commands, self.history.suffix,
                             self._on_own_channel, self._unechoed, self._unechoed_publisher,
                             _is_json_object)
        # channels and info across the nodes: this worker's `node` on the registry (with
        # several Redis, on the first of them only); or a cluster's `directory`, whose
        # channels each master bus subscribes to where they are its own
        self.directory = directory
        self._announces = node is not None
        self._presence_ttl = presence_ttl
        self.occupancy: RedisOccupancy | None = None  # with webhooks
        self.worker = worker
        self._tapped: list[bytes] = []  # @app.on_message's patterns, PSUBSCRIBEd
        if node is not None:
            self.directory = RedisDirectory(
                self._client, hub, prefix, node, worker,
                send=lambda channel, payload: self.publish(channel, payload, None, b""))
        if self.directory is not None:
            self.pushes.directory_channels = set(self.directory.channels)

    @property
    def invalid_total(self) -> int:
        """Payloads from Redis that were not a JSON object in UTF-8."""
        return self.pushes.invalid_total

    def _history(self, ttl: float) -> RedisHistory:
        """History's answers on this worker's reply channel, subscribed from the start."""
        return RedisHistory(self._client, self.prefix, self.hub.history_size, ttl,
                            self.prefix + b"!history:" + new_epoch().encode(),
                            reader=self._reader)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._stay_subscribed()),
                       loop.create_task(self.presence.write_forever()),
                       loop.create_task(self.presence.refresh_forever())]
        if self.directory is not None and self._announces:
            self._tasks.append(loop.create_task(self.directory.announce_forever()))
        if self.occupancy is not None:
            self.occupancy.start()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.occupancy is not None:
            await self.occupancy.stop()
        if self._replacing is not None:
            self._replacing.cancel()
        if self._pipeline is not None:
            self._pipeline.close()
        if self._subscriber is not None and self._subscriber.transport is not None:
            self._subscriber.transport.close()
        self.history.stop()
        if self.directory is not None and self._announces:
            await self.directory.withdraw()
        await self._client.aclose()
        await self._reader.aclose()
        if self._presence_reader is not None:
            await self._presence_reader.aclose()

    # Publishing ---------------------------------------------------------------------

    def publish(self, channel: str, payload: bytes, ack: Acknowledger | None,
                request_id: bytes, exclude: Outbox | None = None) -> int:
        """Queued for the next pipeline; a `published` reply waits for Redis's answer.
        Past MAX_QUEUED_BYTES waiting, REFUSED (_overflowed)."""
        return self._publishes.publish(channel, payload, ack, request_id, exclude, False)

    def publish_history(self, channel: str, payload: bytes, ack: Acknowledger | None,
                        request_id: bytes, exclude: Outbox | None = None) -> int:
        """Through the numbering script, in the publishes' pipeline."""
        return self._publishes.publish(channel, payload, ack, request_id, exclude, True)

    def _overflowed(self) -> None:
        self._set_up()
        log.warning("redis is not keeping up: %d MiB of publishes wait; publishes answer "
                    "503 until half of it is through", MAX_QUEUED_BYTES >> 20)

    def _room(self) -> None:
        self._set_up()
        log.info("the queue of publishes for redis has room again")

    def _schedule_send(self) -> None:
        """_send_publishes at the end of this loop turn."""
        if not self._publishes.scheduled:
            self._publishes.scheduled = True
            self._call_send()

    def _call_send(self) -> None:
        asyncio.get_running_loop().call_soon(self._send_publishes)

    def read_history(self, channel: str, since: int, limit: int,
                     answer: Callable[[HistoryAnswer | None], None]) -> None:
        if not self._connected:
            answer(None)
            return
        self.history.read(channel, since, limit, answer)

    def _send_publishes(self) -> None:
        """This loop turn's publishes, in one write, without waiting for the answers to
        the last: Redis answers them in order, and each answer acknowledges its publish
        (_published, or bus/_resp.pyx for a publish nobody waits for). While the
        publishing connection is being replaced they wait, within MAX_QUEUED_BYTES; if it
        cannot be, they fail (_went_down)."""
        self._publishes.scheduled = False
        pipeline = self._pipeline
        if pipeline is None or not pipeline.alive():
            self.presence.not_written(LOST)  # (what waits for it: publishes, not these)
            return
        presence, waiting = self.presence.take_commands()  # first: see RedisPresence's `send`
        if presence:
            pipeline.send(presence, waiting)
        if self._publishes.waiting():
            commands, entries = self._publishes.take()
            pipeline.send(commands, entries)

    def _published(self, entry: tuple[bytes, bytes, Acknowledger | None, bytes, bool] | int
                   | str, reply: Any) -> None:
        """Redis's answer to a publish (or LOST: the connection went first), or to a
        presence write (presence.redis.CHANGE, FOLLOWING). A publish nobody waits for
        (its entry is its cost) comes here only when it failed."""
        if entry.__class__ is int:
            self._publishes.answered(entry)
            self.dropped_total += 1
            if reply is not LOST:
                self._refused(reply)
            return
        if entry.__class__ is not tuple:
            if entry is CHANGE:
                self.presence.written(reply)
            return
        channel, payload, ack, request_id, history = entry
        self._publishes.answered(publish_cost(channel, payload, request_id))
        ok = not isinstance(reply, Exception)
        if not ok:
            self.dropped_total += 1
            if reply is not LOST:
                self._refused(reply)
        if ack is not None:
            name = channel[len(self.prefix):].decode("ascii")
            if history and ok:
                offset, epoch = reply
                ack.acknowledge(name, request_id, True, position(offset, epoch.decode("ascii")))
            else:
                ack.acknowledge(name, request_id, ok)

    def _refused(self, error: Exception) -> None:
        """Redis answered a publish with an error (at maxmemory, a script it lost): that
        publish alone fails (503). Logged once a minute at most."""
        if str(error).startswith("NOSCRIPT") and self._pipeline is not None:
            self._pipeline.send(self.history.load_command(), [self.loop_future()])
        now = asyncio.get_running_loop().time()
        if now - self._refusals_logged_at >= 60:
            self._refusals_logged_at = now
            log.warning("%s refused a publish: %s (at most one such line a minute)",
                        self.name, error)

    @staticmethod
    def loop_future() -> asyncio.Future[Any]:
        """A future for a reply nobody awaits."""
        return asyncio.get_running_loop().create_future()

    async def _connect_pipeline(self) -> Pipeline:
        """The publishing connection, with history's numbering script loaded."""
        pipeline = await resp.connect(self.url, self._published, CONNECT_TIMEOUT,
                                      self._publishes)
        try:
            await pipeline.call(*self.history.load_parts(), timeout=CONNECT_TIMEOUT)
        except BaseException:
            pipeline.close()
            raise
        pipeline.lost.add_done_callback(lambda _: self._pipeline_lost(pipeline))
        return pipeline

    def _pipeline_lost(self, pipeline: Pipeline) -> None:
        """The publishing connection went (Redis closed it, a restart): its publishes in
        flight failed (503: Redis may have run them, and one sent twice would break "at
        most once"). While the bus is up, another is made at once and the publishes queued
        meanwhile go on it; one that cannot be made takes the bus down."""
        if pipeline is not self._pipeline:
            return
        self._pipeline = None
        if self._connected and self._replacing is None:
            self._replacing = asyncio.get_running_loop().create_task(self._replace_pipeline())

    async def _replace_pipeline(self) -> None:
        try:
            self._pipeline = await self._connect_pipeline()
        except (TimeoutError, OSError, hiredis.ReplyError) as exc:
            self._stalled(f"cannot reconnect to publish: {exc}")
        else:
            self._send_publishes()
        finally:
            self._replacing = None

    def command(self, payload: bytes, ack: Acknowledger | None) -> int:
        """A server API command for every worker of every node, ours too: it comes back
        to each through its subscription to COMMANDS."""
        return self.publish(COMMANDS, payload, ack, b"")

    def _announce(self, channel: str, event: bytes) -> None:
        """A join or leave for the watchers of `channel`, on every node."""
        self.publish(WATCH_PREFIX + channel, event, None, b"")

    # Presence, and what the other nodes have ----------------------------------------

    def joined(self, channel: str, client_id: bytes, user: str, info: str,
               metadata: str = "") -> None:
        self.presence.joined(channel, client_id, user, info, metadata)
        if self.occupancy is not None:
            self.occupancy.local.joined(channel, client_id, user)

    def left(self, channel: str, client_id: bytes) -> None:
        self.presence.left(channel, client_id)
        if self.occupancy is not None:
            self.occupancy.local.left(channel, client_id)

    def watch_transitions(self, listener: Transitions) -> None:
        """Decided in Redis (fastfan.webhooks.redis), within --presence-ttl for a node that dies."""
        self.occupancy = self.occupancy_for(listener)

    def occupancy_for(self, listener: Transitions) -> RedisOccupancy:
        """Transitions decided in this Redis (several Redis decide in their first)."""
        return RedisOccupancy(self._client, self.prefix.decode(), self._presence_ttl,
                              listener)

    def gather_presence(self, channel: str, answer: Callable[[Presence | None], None]) -> None:
        self.presence.gather(channel, answer)

    def gather_channels(self, pattern: str | None, limit: int, local: Counts,
                        answer: Callable[[Counts | None], None]) -> None:
        """Through the node registry, which a bus without a `node` (a shard other than the
        first) does not hold: it answers None."""
        if self.directory is None:
            answer(None)
        else:
            self.directory.gather_channels(pattern, limit, local, answer)

    async def nodes(self) -> list[dict[str, Any]]:
        if self.directory is None:
            raise ConnectionError(f"{self.name}: no node registry here")
        return await self.directory.nodes()

    def health(self) -> BusHealth:
        return BusHealth(up=self.up, dropped=self.dropped_total, invalid=self.invalid_total,
                         down=() if self.up else ("redis down",))

    def figures(self) -> dict[str, float]:
        return redis_figures(self.health())

    # Subscribing --------------------------------------------------------------------

    def subscribe(self, channel: str) -> bool:
        """True: Hub.confirm(channel) follows once Redis answers the SUBSCRIBE (after a
        reconnect, when it answers the SUBSCRIBE of every channel)."""
        if self.occupancy is not None:
            self.occupancy.local.subscribed(channel)
        self._change(channel, True)
        return True

    def unsubscribe(self, channel: str) -> None:
        if self.occupancy is not None:
            self.occupancy.local.unsubscribed(channel)
        self._change(channel, False)

    def _change(self, channel: str, subscribe: bool) -> None:
        self._changes[self.prefix + channel.encode()] = subscribe
        if not self._changes_scheduled:
            self._changes_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_changes)

    def _send_changes(self) -> None:
        """This loop turn's subscribes as one SUBSCRIBE, its unsubscribes as one UNSUBSCRIBE."""
        self._changes_scheduled = False
        changes, self._changes = self._changes, {}
        subscriber = self._subscriber
        if subscriber is None:
            return  # on reconnect every live channel is subscribed again
        added = [c for c, on in changes.items() if on]
        removed = [c for c, on in changes.items() if not on]
        if added:
            subscriber.transport.write(self._subscribe_command(added))
            for channel in added:
                self._unanswered[channel] = self._unanswered.get(channel, 0) + 1
        if removed:
            subscriber.transport.write(self._unsubscribe_command(removed))

    def _subscribe_command(self, channels: list[bytes]) -> bytes:
        return _command(b"SUBSCRIBE", *channels)

    def _unsubscribe_command(self, channels: list[bytes]) -> bytes:
        return _command(b"UNSUBSCRIBE", *channels)

    def on_sunsubscribed(self, channel: bytes) -> None:
        """Sharded pub/sub's (ClusterMaster): a plain Redis pushes no `sunsubscribe`."""

    def on_moved(self, error: str) -> None:
        """Sharded pub/sub's (ClusterMaster): a plain Redis answers no MOVED."""

    def on_subscribed(self, channel: bytes) -> None:
        """Redis answered a SUBSCRIBE: from now on it sends us what is published there."""
        count = self._unanswered.get(channel, 0)
        if count > 1:
            self._unanswered[channel] = count - 1
        elif count == 1:
            del self._unanswered[channel]
            self.hub.confirm(channel[len(self.prefix):].decode("ascii"))

    def tap_messages(self, patterns: list[str], tap: Callable[[str, bytes], None]) -> None:
        """Every node's first worker PSUBSCRIBEs to the patterns: whatever publishes on
        Redis (another node, the server API, a bare PUBLISH), it hears it once."""
        if self.worker == 0:
            self.message_tap = tap
            self._tapped = [self.prefix + pattern.encode() for pattern in patterns]

    def on_tapped(self, channel: bytes, payload: bytes) -> None:
        """A message of a pattern tap_messages named (the clients' channels only)."""
        name = channel[len(self.prefix):].decode("ascii", errors="replace")
        if self.message_tap is not None and is_valid_channel(name) \
                and self.pushes.well_formed(payload):
            self.message_tap(name, payload)

    def _on_own_channel(self, channel: bytes, payload: bytes) -> None:
        """A message on one of the server's own channels (Pushes.message): the server
        API's commands, this worker's history answers, the directory's queries."""
        if channel == self._commands:
            apply_command(self.hub, payload)
        elif self.history.is_reply(channel):
            self.history.answered(payload)
        elif self.directory is not None:
            self.directory.received(channel, payload)

    def _unechoed_publisher(self, payload: bytes) -> Outbox | None:
        """The publisher a message comes back to be kept from ("echo":false), if any."""
        publisher = self._unechoed.pop(payload, None)
        if publisher is None and (numbered := payload.rfind(b',"offset":')) > 0:
            publisher = self._unechoed.pop(payload[:numbered], None)
        return publisher

    async def _stay_subscribed(self) -> None:
        attempt = 0
        while True:
            try:
                subscriber = await self._connect()
                await asyncio.wait_for(subscriber.ready, CONNECT_TIMEOUT)
                if self._pipeline is None or not self._pipeline.alive():
                    self._pipeline = await self._connect_pipeline()
                await self._pipeline.call(b"PING", timeout=CONNECT_TIMEOUT)
            except (TimeoutError, OSError, hiredis.ReplyError) as exc:
                if self._subscriber is not None and self._subscriber.transport is not None:
                    self._subscriber.transport.close()
                self._subscriber = None
                if self._pipeline is not None:
                    self._pipeline.close()
                attempt += 1
                self._went_down(f"cannot reach redis: {exc}")
                await asyncio.sleep(reconnect_delay(attempt))
                continue
            attempt = 0
            self._came_up(f"{len(self.hub.channels)} channels subscribed")
            if self.presence.predecessor:  # once up, as its leaves are publishes
                self._tasks.append(asyncio.get_running_loop().create_task(
                    self.presence.forget_predecessor()))
            await self._watch(subscriber)
            self._subscriber = None
            self.history.fail_all()  # their answers would have come on it
            self._went_down("connection to redis lost")

    async def _watch(self, subscriber: Subscriber) -> None:
        """Until the connection is lost, PING every HEARTBEAT; no answer in
        PIPELINE_TIMEOUT drops it (and the bus goes down until Redis answers again), as
        publishes Redis leaves unanswered that long do."""
        while not subscriber.lost.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(subscriber.lost), HEARTBEAT)
            if subscriber.lost.done():
                return
            if subscriber.loop.time() - subscriber.answered > PIPELINE_TIMEOUT:
                self._stalled(f"no answer to a PING in {PIPELINE_TIMEOUT:g} s")
                await subscriber.lost
                return
            if self._pipeline is not None and self._pipeline.stalled_for() > PIPELINE_TIMEOUT:
                self._stalled(f"no answer to a pipeline in {PIPELINE_TIMEOUT:g} s")
                await subscriber.lost
                return
            subscriber.heartbeat()

    async def _connect(self) -> Subscriber:
        loop = asyncio.get_running_loop()
        parts = urlsplit(self.url)
        tls = ssl.create_default_context() if parts.scheme == "rediss" else None
        _, subscriber = await asyncio.wait_for(loop.create_connection(
            lambda: Subscriber(self), parts.hostname or "localhost", parts.port or 6379,
            ssl=tls), CONNECT_TIMEOUT)
        commands = []
        if parts.password is not None:
            credentials = [unquote(parts.password).encode()]
            if parts.username:
                credentials.insert(0, unquote(parts.username).encode())
            commands.append(_command(b"AUTH", *credentials))
        owns = self.owns
        channels = [self.prefix + name.encode() for name in self.hub.channels
                    if owns is None or owns(name)]
        self._unanswered = dict.fromkeys(channels, 1)
        commands.append(self._subscribe_command([*self._standing_channels(), *channels]))
        if self._tapped:
            commands.append(_command(b"PSUBSCRIBE", *self._tapped))
        commands.append(_command(b"PING"))  # answered only once the above are done
        subscriber.transport.write(b"".join(commands))
        self._subscriber = subscriber  # from here on, channel changes go to this connection
        return subscriber

    def _standing_channels(self) -> list[bytes]:
        """What the subscribing connection subscribes to whatever the clients do: history's
        answers, the server API's commands, the directory's queries."""
        standing = [COMMANDS, *(self.directory.names if self.directory is not None else ())]
        return [self.history.reply_channel, *(self.prefix + name.encode() for name in standing)]

    def _stalled(self, reason: str) -> None:
        """Drop both connections: only a Redis that answers again brings the bus back up.
        The publishes Redis has not answered fail (503)."""
        self._went_down(reason)
        if self._subscriber is not None and self._subscriber.transport is not None:
            self._subscriber.transport.abort()
        if self._pipeline is not None:
            self._pipeline.close()

    def _came_up(self, detail: str) -> None:
        """Both connections answer: publishes are taken, after `settle` past the first time."""
        self._connected = True
        if self._ever_connected and self.settle:
            self._settling = asyncio.get_running_loop().call_later(self.settle, self._settled)
        self._ever_connected = True
        self._set_up()
        self._report(True, detail)

    def _set_up(self) -> None:
        self.up = self._publishes.up = (self._connected and not self._publishes.full
                                        and self._settling is None)

    def _settled(self) -> None:
        self._settling = None
        self._set_up()

    def _went_down(self, reason: str) -> None:
        self._connected = False
        if self._settling is not None:
            self._settling.cancel()
            self._settling = None
        self._unechoed.clear()
        self._set_up()
        _, unsent = self._publishes.take()  # (waiting for a publishing connection)
        for entry in unsent:
            self._published(entry, LOST)
        self._report(False, f"{reason}; publishes answer 503 until it is back")

    def _report(self, up: bool, detail: str) -> None:
        """One log line per change of state, not one per failed attempt."""
        if self._reported != up:
            self._reported = up
            if up:
                log.info("%s up: %s", self.name, detail)
            else:
                log.warning("%s down: %s", self.name, detail)


def redis_figures(health: BusHealth) -> dict[str, float]:
    """/metrics' rows of a bus through Redis (one, shards, or a cluster)."""
    return {"dropped_bus_total": float(health.dropped), "redis_up": float(health.up),
            "dropped_invalid_total": float(health.invalid)}
