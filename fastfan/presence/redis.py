"""Presence in Redis, for nodes that share channels through it.

Per channel, a hash of clientId -> [user, info] (JSON) and a sorted set of clientId by
expiry time, `{<prefix><channel>}:presence` and `{<prefix><channel>}:presence:expiry`:
hash-tagged by the channel's Redis channel, as its history keys are, so that on a cluster
everything naming a channel (its pub/sub, presence and history) is in one slot, on one
master, and fails over in one step (a shard holds it all too). A worker writes
what its subscribers do (joined, left) in one pipeline per loop turn, never a round trip
per subscribe, and every TTL/3 seconds pushes the expiry of all its present subscribers
forward: a node that dies without a word drops out of presence within --presence-ttl. A
query runs one script that first removes the expired entries, then reads the hash.

While Redis is unreachable every write fails: the log says so once when they start
failing, then once a minute how many changes were not written, and once when writes work
again (Outage), never a line per change.
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

from .._core import join_leave_event
from ..bus.base import HubLink
from ..bus.resp import command
from ..directory import GATHER_TIMEOUT
from . import Entries, Presence

log = logging.getLogger("fastfan.redis")

# KEYS: the hash, the expiry set; ARGV: now (seconds), and "1" to read what is left.
# Expired clientIds leave both; the answer is {expired clientId, [user, info]... } and,
# when asked, {every clientId, [user, info]...}. Atomic: each expired entry is returned to
# one caller only, who announces its leave.
EXPIRE_PRESENCE = """
local expired = {}
for _, client in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])) do
  local member = redis.call('HGET', KEYS[1], client)
  if member then
    redis.call('HDEL', KEYS[1], client)
    table.insert(expired, client)
    table.insert(expired, member)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if ARGV[2] == '1' then return {expired, redis.call('HGETALL', KEYS[1])} end
return {expired, {}}
"""
# How many entries one refresh pipeline carries.
REFRESH_BATCH = 5000
# While writes fail: how often the changes not written are counted in the log.
OUTAGE_REPORT_PERIOD = 60.0

# What waits for the replies to a change's commands on the publishing connection
# (take_commands): its first command's (the change's outcome), and the others'.
CHANGE, FOLLOWING = "presence change", "presence write"
JOIN_REPLIES = [CHANGE, FOLLOWING, FOLLOWING, FOLLOWING]
LEAVE_REPLIES = [CHANGE, FOLLOWING]

_encode = msgspec.json.encode
# [user, info] or [user, info, metadata]: connection.metadata, as JSON text
_decode_list = msgspec.json.Decoder(list[str]).decode


def _decode_member(member: bytes) -> list[str]:
    """A hash value of fastfan's: [user, info] or [user, info, metadata]."""
    decoded = _decode_list(member)
    if not 2 <= len(decoded) <= 3:
        raise msgspec.DecodeError("not a presence member")
    return decoded


class Outage:
    """Presence's writes while they fail: a warning when they start failing, the changes
    not written once every `period` while they do (as the next failure comes),
    and a line when a write works again. With 1,000 subscribers coming and going, a line
    per failed write was 2,565 lines in 4 minutes (issue 26)."""

    def __init__(self, period: float = OUTAGE_REPORT_PERIOD) -> None:
        self.period = period
        self.since: float | None = None  # when writes began to fail; None while they work
        self.reported_at = 0.0
        self.unwritten = 0  # changes not written since the last line
        self.unwritten_total = 0  # since writes began to fail

    def failed(self, changes: int, exc: BaseException) -> None:
        now = time.monotonic()
        self.unwritten_total += changes
        if self.since is None:
            self.since = self.reported_at = now
            log.warning("presence: writes to Redis fail (%s): %d changes not written; the "
                        "changes not written are counted once a minute until it is back",
                        exc, changes)
            return
        self.unwritten += changes
        if now - self.reported_at >= self.period:
            log.warning("presence: writes to Redis still fail (%s): %d changes not written "
                        "in %.0f s", exc, self.unwritten, now - self.reported_at)
            self.reported_at, self.unwritten = now, 0

    def worked(self) -> None:
        if self.since is not None:
            log.warning("presence: writes to Redis work again after %.0f s; %d changes were "
                        "not written meanwhile: the next refresh (every --presence-ttl/3) "
                        "writes every present subscriber again, and those that left expire",
                        time.monotonic() - self.since, self.unwritten_total)
            self.since, self.unwritten, self.unwritten_total = None, 0, 0


class RedisPresence:
    def __init__(self, client: aioredis.Redis, hub: HubLink, prefix: str, ttl: float, *,
                 announce: Callable[[str, bytes], None], predecessor: str = "",
                 owns: Callable[[str], bool] | None = None,
                 reader: aioredis.Redis | None = None,
                 send: Callable[[], None] | None = None) -> None:
        self.client = client  # refreshes, and writes without `send`
        # With `send`, the changes go on the bus's publishing connection (`send` has the
        # bus take them, `take_commands`, at the end of the loop turn), ahead of the turn's
        # publishes: a join event never overtakes its entry, so a watcher that asks for
        # presence on a join finds the joiner. Else write_forever writes them on `client`.
        self._send = send
        self.hub = hub
        self.prefix = prefix
        self.ttl = ttl
        # (joined?, channel, clientId, [user, info] as JSON) in order, until written
        self._changes: list[tuple[bool, str, str, bytes]] = []
        self._written = asyncio.Event()
        self._expire = client.register_script(EXPIRE_PRESENCE)
        # a gather's read, on the reads' pool: a burst of presence requests never takes the
        # connections the publishes need (issue #25, finding 5)
        self._read = (reader or client).register_script(EXPIRE_PRESENCE)
        self.announce = announce  # (channel, join/leave event) to every node
        # the clientId prefix of the worker this one replaces: its clients are gone
        self.predecessor = predecessor
        self.owns = owns  # with several Redis: the channels whose presence is kept here
        self.outage = Outage()

    def keys(self, channel: str) -> tuple[str, str]:
        tagged = f"{{{self.prefix}{channel}}}:presence"
        return tagged, f"{tagged}:expiry"

    def joined(self, channel: str, client_id: bytes, user: str, info: str,
               metadata: str = "") -> None:
        member = [user, info, metadata] if metadata else [user, info]
        self._changes.append((True, channel, client_id.decode("ascii"), _encode(member)))
        self._wake()

    def left(self, channel: str, client_id: bytes) -> None:
        self._changes.append((False, channel, client_id.decode("ascii"), b""))
        self._wake()

    def _wake(self) -> None:
        if self._send is None:
            self._written.set()
        else:
            self._send()

    def take_commands(self) -> tuple[bytes, list[str]]:
        """The changes not written yet, as commands for the publishing connection, in
        order, and what waits for each command's reply: CHANGE for a change's first (its
        reply goes to `written`), FOLLOWING for the others."""
        changes, self._changes = self._changes, []
        expires = b"%.3f" % (time.time() + self.ttl)
        ttl = b"%d" % (int(self.ttl) + 1)
        commands: list[bytes] = []
        waiting: list[str] = []
        for joined, channel, client_id, member in changes:
            entries, expiry = (key.encode() for key in self.keys(channel))
            client = client_id.encode("ascii")
            if joined:
                commands += [command(b"HSET", entries, client, member),
                             command(b"ZADD", expiry, expires, client),
                             command(b"EXPIRE", entries, ttl), command(b"EXPIRE", expiry, ttl)]
                waiting += JOIN_REPLIES
            else:
                commands += [command(b"HDEL", entries, client), command(b"ZREM", expiry, client)]
                waiting += LEAVE_REPLIES
        return b"".join(commands), waiting

    def not_written(self, reason: BaseException) -> None:
        """The changes waiting cannot be written (the bus is down): dropped, counted; the
        refresh after the outage writes every present subscriber again."""
        if self._changes:
            self.outage.failed(len(self._changes), reason)
            self._changes = []

    def written(self, reply: Any) -> None:
        """Redis's reply to a change's first command (see take_commands)."""
        if isinstance(reply, Exception):
            self.outage.failed(1, reply)
        else:
            self.outage.worked()

    async def write_forever(self) -> None:
        """What this loop turn's subscribers did, as one pipeline; the order is kept."""
        if self._send is not None:
            return  # the bus writes them (take_commands)
        while True:
            await self._written.wait()
            self._written.clear()
            changes, self._changes = self._changes, []
            pipe = self.client.pipeline(transaction=False)
            expires = time.time() + self.ttl
            for joined, channel, client_id, member in changes:
                entries, expiry = self.keys(channel)
                if joined:
                    pipe.hset(entries, client_id, member)
                    pipe.zadd(expiry, {client_id: expires})
                    pipe.expire(entries, int(self.ttl) + 1)
                    pipe.expire(expiry, int(self.ttl) + 1)
                else:
                    pipe.hdel(entries, client_id)
                    pipe.zrem(expiry, client_id)
            await self._execute(pipe, len(changes))

    async def forget_predecessor(self) -> None:
        """The worker this one replaces died: its clients leave presence now, not within
        the TTL, and their leave is announced (once: only the HDEL that removed an entry)."""
        if not self.predecessor:
            return
        self.predecessor, predecessor = "", self.predecessor
        pattern = f"{{{self.prefix}*}}:presence"
        clients = f"{predecessor}-*"
        try:
            async for key in self.client.scan_iter(match=pattern, count=1000):
                channel = key.decode()[len(self.prefix) + 1:-len("}:presence")]
                entries, expiry = self.keys(channel)
                async for client_id, member in self.client.hscan_iter(entries, match=clients):
                    if await self.client.hdel(entries, client_id):
                        await self.client.zrem(expiry, client_id)
                        user, info, *_ = _decode_member(member)
                        self.announce(channel, join_leave_event(b"leave", channel, client_id,
                                                                user, info))
        except (aioredis.RedisError, OSError, msgspec.DecodeError) as exc:
            log.warning("presence: the clients of the worker replaced are left to expire: %s",
                        exc)

    async def refresh_forever(self) -> None:
        """Push the expiry of every present subscriber of this worker forward."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            pipe = self.client.pipeline(transaction=False)
            pending = 0
            expires = time.time() + self.ttl
            for channel, entries in self.local_presence():
                entry_key, expiry_key = self.keys(channel)
                for client_id, *member in entries:
                    pipe.hset(entry_key, client_id, _encode(member))
                    pipe.zadd(expiry_key, {client_id: expires})
                    pending += 1
                pipe.expire(entry_key, int(self.ttl) + 1)
                pipe.expire(expiry_key, int(self.ttl) + 1)
                if pending >= REFRESH_BATCH:
                    await self._execute(pipe, 0)
                    pipe, pending = self.client.pipeline(transaction=False), 0
            await self._execute(pipe, 0)
            for channel, _ in self.local_presence():  # others' clients gone without a word
                with contextlib.suppress(aioredis.RedisError, OSError):
                    await self._expired_and_present(channel, read=False)

    async def _expired_and_present(self, channel: str, *, read: bool) -> list[bytes]:
        """Drop the channel's expired entries and announce their leave; with `read`, the
        flat [clientId, member, ...] of those present."""
        script = self._read if read else self._expire
        expired, present = await script(keys=list(self.keys(channel)),
                                        args=[time.time(), "1" if read else "0"])
        for index in range(0, len(expired), 2):
            try:
                user, info, *_ = _decode_member(expired[index + 1])
            except msgspec.DecodeError:
                continue  # not written by fastfan
            self.announce(channel, join_leave_event(b"leave", channel, expired[index], user,
                                                    info))
        return list(present)

    def local_presence(self) -> list[tuple[str, Entries]]:
        allows, owns = self.hub.presence_channels.allows, self.owns
        return [(name, self.hub.presence_of(name)) for name in self.hub.subscriber_counts()
                if allows(name) and (owns is None or owns(name))]

    async def _execute(self, pipe: Any, changes: int) -> None:
        """A pipeline of writes: `changes` joins and leaves (0: a refresh, which a change
        not written waits for)."""
        if not len(pipe):
            return  # sends nothing: says nothing of Redis
        try:
            await pipe.execute()
        except (aioredis.RedisError, OSError) as exc:
            self.outage.failed(changes, exc)
        else:
            self.outage.worked()

    def gather(self, channel: str, answer: Callable[[Presence | None], None]) -> None:
        asyncio.get_running_loop().create_task(self._gather(channel, answer))

    async def _gather(self, channel: str, answer: Callable[[Presence | None], None]) -> None:
        """Every node's subscribers, from Redis, and ours (some may not be written yet)."""
        try:
            # A deadline, as every gather has (bus/gather.py): a Redis that stalls must not
            # keep the channel's gather, and every request waiting on it, open for good.
            flat = await asyncio.wait_for(self._expired_and_present(channel, read=True),
                                          GATHER_TIMEOUT)
        except (aioredis.RedisError, OSError, TimeoutError):
            answer(None)
            return
        everyone = {entry[0]: entry for entry in self.hub.presence_of(channel)}
        for index in range(0, len(flat), 2):
            client_id = flat[index].decode()
            if client_id not in everyone:
                try:
                    member = _decode_member(flat[index + 1])
                except msgspec.DecodeError:
                    continue  # not written by fastfan
                everyone[client_id] = [client_id, *member]
        entries = list(everyone.values())
        answer((len(entries), list({entry[1] for entry in entries}),
                entries[:self.hub.presence_limit]))
