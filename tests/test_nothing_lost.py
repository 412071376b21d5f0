"""Nothing lost silently: under each fault, count the messages acknowledged with
`published` that a subscriber who stayed connected did not receive."""

from __future__ import annotations

import os
import re
import signal
import threading
from typing import Any

import pytest
from support.processes import children
from support.redis import RedisServer
from support.server import Server
from support.waiting import wait_for
from support.wire import RawClient
from support.workers import every, place, worker_of


def connect(server: Server, **options: Any) -> RawClient:
    return server.connect(timeout=10, **options)


def publish_each(publisher: RawClient, channel: str, numbers: range, between: Any = None,
                 pad: str | None = None) -> tuple[list[int], list[int]]:
    """Publish with ids one at a time; (acknowledged, refused with 503)."""
    acked, refused = [], []
    for n in numbers:
        if between is not None:
            between(n)
        data = n if pad is None else [n, pad]
        publisher.publish(channel, data, id=n)
        reply = publisher.recv_json()
        assert reply["id"] == n
        if reply["type"] == "published":
            acked.append(n)
        else:
            assert (reply["type"], reply["code"]) == ("error", 503)
            refused.append(n)
    return acked, refused


def received(client: RawClient, until: int) -> list[int]:
    """Data of the messages a subscriber got, up to and including `until`."""
    got: list[int] = []
    while not got or got[-1] != until:
        message = client.recv_json()
        if message["type"] == "message":
            got.append(message["data"])
    return got


@pytest.mark.slow
def test_a_worker_killed_elsewhere_loses_nothing_acknowledged(start_server: Any) -> None:
    server = start_server("--workers", "3")
    workers = children(server.process.pid)
    publisher = connect(server)
    home = worker_of(server, publisher, workers)
    victim = next(pid for pid in workers if pid != home)
    # subscribers on the two workers that will live
    stayers = every(place(server, 3, connect=lambda: connect(server), channels=("kept",),
                          workers=[pid for pid in workers if pid != victim]))

    def kill_midway(n: int) -> None:
        if n == 150:
            os.kill(victim, signal.SIGKILL)

    acked, refused = publish_each(publisher, "kept", range(300), kill_midway)
    assert refused == [] and len(acked) == 300
    for client in stayers:
        assert set(acked) - set(received(client, 299)) == set()


@pytest.mark.slow
def test_a_slow_consumer_cut_off_costs_the_others_nothing(start_server: Any) -> None:
    server = start_server("--max-buffer", str(64 << 10), "--publish-rate", "100000")
    stalled = connect(server, receive_buffer=4096).subscribe("wide")
    others = [connect(server).subscribe("wide") for _ in range(3)]
    readers = [Reader(client, 1500) for client in others]  # they read as fast as they can
    publisher = connect(server)
    # 12 MB: far past the stalled client's window and --max-buffer
    acked, refused = publish_each(publisher, "wide", range(1500), pad="x" * 8000)
    assert refused == []
    for reader in readers:
        reader.join(60)
        assert set(acked) - set(reader.got) == set()
    assert stalled.recv_close() == (4008, "slow consumer")


class Reader(threading.Thread):
    def __init__(self, client: RawClient, count: int) -> None:
        super().__init__(daemon=True)
        self.client, self.count, self.got = client, count, []
        self.start()

    def run(self) -> None:
        while len(self.got) < self.count:
            self.got.append(self.client.recv_json()["data"][0])


@pytest.mark.slow
def test_a_redis_restart_refuses_what_it_cannot_carry_and_delivers_the_rest(
        start_server: Any, redis_server: RedisServer) -> None:
    nodes = [start_server("--redis", redis_server.url) for _ in range(2)]
    for node in nodes:
        node.wait_ready()
    subscribers = [connect(node).subscribe("steady") for node in nodes]
    wait_for(lambda: redis_server.subscribers("steady") == 2)
    publisher = connect(nodes[0])
    got: list[list[int]] = [[] for _ in subscribers]

    def outage(n: int) -> None:
        if n == 100:
            # Redis answers a PUBLISH before it writes the message to the subscribing
            # connections: killed in between (a busy machine can hold it there), it loses
            # what it acknowledged, whatever the nodes do. So it dies once they have it all.
            for client, seen in zip(subscribers, got, strict=True):
                seen += received(client, 99)
            redis_server.kill()
        if n == 200:
            # "After the reconnect" means after both nodes subscribed again: Redis pub/sub
            # delivers a PUBLISH only to the subscriptions it has at that moment.
            redis_server.start()
            wait_for(lambda: redis_server.subscribers("steady") == 2)

    acked, refused = publish_each(publisher, "steady", range(500), outage)
    assert acked[:100] == list(range(100))  # all before the outage went through
    assert refused  # during it, publishes were refused, not swallowed
    assert acked[-1] == 499  # and after it they go through again
    assert set(acked) | set(refused) == set(range(500))  # each got one answer or the other
    for client, seen in zip(subscribers, got, strict=True):
        seen += received(client, 499)
        assert set(acked) - set(seen) == set()  # every acknowledged message arrived
        assert set(seen) & set(refused) == set()  # no refused one did
        assert seen == sorted(seen)


@pytest.mark.slow
def test_a_pipeline_redis_cuts_off_costs_its_publishes_alone(
        start_server: Any, redis_server: RedisServer) -> None:
    """Redis closes the publishing connection of a pipeline in flight (CLIENT KILL while a
    CLIENT PAUSE holds its PUBLISH), the subscribing connection untouched: that publish is
    refused and never delivered, and the bus takes publishes again as soon as Redis
    answers, which it does at once. (It stayed down for good: nothing brought it up while
    the subscribing connection lived.)"""
    node = start_server("--redis", redis_server.url)
    node.wait_ready()
    subscriber = connect(node).subscribe("cut")
    wait_for(lambda: redis_server.subscribers("cut") == 1)
    publisher = connect(node)
    redis_server.command("CLIENT", "PAUSE", "10000", "WRITE")
    publisher.publish("cut", 0, id=0)
    held = wait_for(lambda: paused_publishes(redis_server))
    redis_server.command("CLIENT", "KILL", "ID", held[0])
    redis_server.command("CLIENT", "UNPAUSE")
    reply = publisher.recv_json()
    assert (reply["type"], reply["code"], reply["id"]) == ("error", 503, 0)
    node.wait_ready()
    acked, refused = publish_each(publisher, "cut", range(1, 51))
    assert refused == []
    assert received(subscriber, 50) == acked


def paused_publishes(redis: RedisServer) -> list[str]:
    """The ids of the connections whose PUBLISH a CLIENT PAUSE holds."""
    listing = redis.command("CLIENT", "LIST").decode()
    return [line.split()[0].removeprefix("id=") for line in listing.splitlines()
            if re.search(r" flags=b .* cmd=publish ", line)]


@pytest.mark.slow
def test_publishing_connections_redis_closed_while_idle_cost_no_publish(
        start_server: Any, redis_server: RedisServer) -> None:
    """Redis closes the pooled publishing connections while they are idle (as a restart
    leaves them, or its `timeout`): the next pipeline goes out on a new connection, not on
    a closed one, so no publish is refused. (redis-py 8.1 handed out the closed one.)"""
    node = start_server("--redis", redis_server.url)
    node.wait_ready()
    subscriber = connect(node).subscribe("idle")
    wait_for(lambda: redis_server.subscribers("idle") == 1)
    publisher = connect(node)
    assert publish_each(publisher, "idle", range(3)) == ([0, 1, 2], [])
    redis_server.command("CLIENT", "KILL", "TYPE", "normal")  # not the subscribing one (pubsub)
    assert publish_each(publisher, "idle", range(3, 6)) == ([3, 4, 5], [])
    assert received(subscriber, 5) == list(range(6))
