"""Channels sharded over three real redis-servers (`--redis URL1,URL2,URL3`), which the
tests kill and restart: each channel on the shard the documented hash names."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot
from support.api import call, start_api
from support.messages import (
    alive,
    closed_by_api,
    drop_and_recover,
    each_reaches_every_listener,
    publish,
)
from support.redis import RedisServer
from support.server import Server
from support.waiting import assert_received_by_all, wait_for

SHARDS = 3


@pytest.fixture
def shards(tmp_path: Path) -> Iterator[list[RedisServer]]:
    servers = [RedisServer(tmp_path / f"redis-{index}.log") for index in range(SHARDS)]
    yield servers
    for server in servers:
        server.kill()


def urls(shards: list[RedisServer]) -> str:
    return ",".join(shard.url for shard in shards)


def home(channel: str) -> int:
    """The shard of `channel`, by the formula docs/protocol.md gives a backend."""
    return key_slot(f"fastfan:{channel}".encode()) % SHARDS


def channels_on(shard: int, count: int, stem: str = "ch") -> list[str]:
    """`count` channel names whose home is `shard`."""
    names = (f"{stem}{n}" for n in range(10_000))
    return [name for name, _ in zip((n for n in names if home(n) == shard), range(count),
                                    strict=False)]


def node(start_server: Any, shards: list[RedisServer], *args: str) -> Server:
    server = start_server("--redis", urls(shards), *args)
    server.wait_ready()
    return server


@pytest.mark.slow
def test_each_channel_its_pub_sub_and_presence_on_its_shard(
        start_server: Any, shards: list[RedisServer]) -> None:
    near = node(start_server, shards)
    far = node(start_server, shards, "--workers", "2")
    names = [name for shard in range(SHARDS) for name in channels_on(shard, 2)]
    listeners = [server.connect().subscribe(*names) for server in (near, far)]
    for name in names:
        wait_for(lambda name=name: [s.subscribers(name) for s in shards] == [
            2 if index == home(name) else 0 for index in range(SHARDS)])
        presence = f"{{fastfan:{name}}}:presence"
        assert [s.command("EXISTS", presence) for s in shards] == [
            b":1\r\n" if index == home(name) else b":0\r\n" for index in range(SHARDS)]
    publisher = near.connect()
    each_reaches_every_listener(publisher, listeners, names)
    # A backend publishes with one PUBLISH to the shard the hash names.
    message = b'{"type":"message","channel":"%s","data":"backend"}' % names[0].encode()
    assert shards[home(names[0])].command("PUBLISH", f"fastfan:{names[0]}", message) == (
        b":2\r\n")
    for listener in listeners:
        assert listener.recv_json()["data"] == "backend"


@pytest.mark.slow
def test_join_leave_and_presence_across_nodes(start_server: Any,
                                             shards: list[RedisServer]) -> None:
    near, far = node(start_server, shards), node(start_server, shards)
    # "#room" (the watchers' channel) and "room" on different shards: both used
    room = next(name for name in (f"room{n}" for n in range(100))
                if home(name) != home("#" + name))
    watch = far.connect("watcher")
    watch.send_json({"type": "subscribe", "channel": room, "joinLeave": True})
    assert watch.recv_json() == {"type": "subscribed", "channel": room}
    joiner = near.connect("joiner").subscribe(room)
    event = watch.recv_json()
    assert (event["type"], event["data"]["user"]) == ("join", "joiner")
    watch.send_json({"type": "presence", "channel": room})
    users = sorted(c["user"] for c in watch.recv_json()["data"]["clients"])
    assert users == ["joiner", "watcher"]
    joiner.close()
    event = watch.recv_json()
    assert (event["type"], event["data"]["user"]) == ("leave", "joiner")


@pytest.mark.slow
def test_a_shard_down_fails_only_its_channels_and_comes_back(
        start_server: Any, shards: list[RedisServer]) -> None:
    near, far = node(start_server, shards), node(start_server, shards)
    lost, kept = channels_on(1, 1)[0], channels_on(2, 1)[0]
    listener = far.connect().subscribe(lost, kept)
    wait_for(lambda: shards[1].subscribers(lost) == 1 and shards[2].subscribers(kept) == 1)
    publisher = near.connect()

    shards[1].kill()
    refused = wait_for(lambda: (r := publish(publisher, lost, "during", 1))["type"] == "error"
                       and r, timeout=5)
    assert (refused["code"], refused["id"]) == (503, 1)
    assert publish(publisher, kept, "kept", 2)["type"] == "published"
    assert listener.recv_json()["data"] == "kept"
    status, _, body = near.get("/ready")
    assert status == 503
    assert body == f"shard 1 down (127.0.0.1:{shards[1].port})\n".encode()
    assert "shard 0" not in body.decode() and "shard 2" not in body.decode()
    figures = wait_for(lambda: (m := near.metrics())["fastfan_redis_shards_down"] == 1 and m)
    assert figures["fastfan_redis_up"] == 0

    shards[1].start()
    wait_for(lambda: shards[1].subscribers(lost) == 1, timeout=5)
    near.wait_ready(timeout=5)
    assert publish(publisher, lost, "after", 3)["type"] == "published"
    assert listener.recv_json()["data"] == "after"  # nothing refused arrived
    assert near.metrics()["fastfan_redis_shards_down"] == 0
    downs = [line for line in near.log().splitlines() if "down" in line]
    assert len(downs) == 1 and "redis shard 1" in downs[0]


@pytest.mark.slow
def test_api_commands_reach_every_node_from_any_shard(
        start_server: Any, shards: list[RedisServer]) -> None:
    near, port = start_api(start_server, "--redis", urls(shards))
    far = node(start_server, shards, "--workers", "2")
    near.wait_ready()
    alice, bob = [near.connect("alice"), far.connect("alice")], far.connect("bob")
    assert call(port, "disconnect", {"user": "alice"}) == (200, {"result": {}})
    for client in alice:
        closed_by_api(client)
    assert alive(bob)
    # every worker listens for commands on every shard: a backend may use any one
    elsewhere = (home("!commands") + 1) % SHARDS
    shards[elsewhere].command("PUBLISH", "fastfan:!commands",
                              b'{"command":"disconnect","user":"bob"}')
    closed_by_api(bob)


@pytest.mark.slow
def test_nothing_acknowledged_is_lost_while_a_shard_restarts(
        start_server: Any, shards: list[RedisServer]) -> None:
    """Every publish answered `published` reaches the subscribers of both nodes, through a
    shard's death and return (which takes publishes again only once both have subscribed
    again); the others got 503."""
    near = node(start_server, shards, "--publish-rate", "1000000")
    far = node(start_server, shards)
    names = [name for shard in range(SHARDS) for name in channels_on(shard, 2, "n")]
    listeners = [server.connect(receive_buffer=1 << 20).subscribe(*names)
                 for server in (near, far)]
    publisher = near.connect()
    acknowledged: set[int] = set()
    refused: set[int] = set()
    started, killed, restarted = time.monotonic(), False, False
    sequence = 0
    back = 0  # acknowledged on the restarted shard since its last refusal
    while time.monotonic() - started < 15 and (not restarted or back < 150):
        elapsed = time.monotonic() - started
        if elapsed > 0.3 and not killed:
            shards[0].kill()
            killed = True
        if elapsed > 0.8 and not restarted:
            shards[0].start()
            restarted = True
        reply = publish(publisher, names[sequence % len(names)], sequence, sequence)
        (acknowledged if reply["type"] == "published" else refused).add(sequence)
        if reply["type"] != "published":
            back = 0
        elif killed and home(names[sequence % 6]) == 0:
            back += 1
        sequence += 1
    after = max(refused)  # the shard's channels took publishes again after it
    assert len({n for n in acknowledged if n > after and home(names[n % 6]) == 0}) > 100
    assert_received_by_all(listeners, acknowledged)
    assert len(refused) > 100
    print(f"{len(acknowledged)} acknowledged and delivered to both nodes, "
          f"{len(refused)} refused (503)")


@pytest.mark.slow
def test_history_and_recovery_on_the_channel_s_shard(
        start_server: Any, shards: list[RedisServer]) -> None:
    near, far = (node(start_server, shards, "--history-size", "2000") for _ in range(2))
    drop_and_recover(near, near.connect(), far.connect)  # a seam across nodes, on "ticks"
    stream = "{fastfan:ticks}:history"
    assert [s.command("EXISTS", stream) for s in shards] == [
        b":1\r\n" if index == home("ticks") else b":0\r\n" for index in range(SHARDS)]
