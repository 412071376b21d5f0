"""What every bus must do alike, end to end: the same tests, through real server processes
and real clients, on each deployment a bus makes: one worker (local), two workers (the
embedded mesh), two nodes on one redis-server, two nodes on two Redis shards, two nodes on
a Redis Cluster.

Only the wire protocol and the HTTP API are spoken here, never the Bus interface: a bus is
judged by what its users see.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.api import call, channels, name_of, nodes, start_api
from support.messages import (
    alive,
    closed_by_api,
    drop_and_recover,
    interleaved,
    offsets,
    publish,
    subscribe,
)
from support.redis import RedisServer
from support.server import Server
from support.waiting import collect, wait_for
from support.wire import RawClient
from support.workers import every, place

# history on the channels the tests below give it (drop_and_recover's is "ticks"), no other
OPTIONS = ("--history-size", "2000", "--history-channels", "h.*,ticks")
# namespaces for the channels the namespace tests give them (every other channel keeps the
# global options, so the other tests run with namespaces configured and unused)
NAMESPACES = """
[[namespace]]
channels = ["cached.*"]
cache = true

[[namespace]]
channels = ["short.*"]
history_size = 3

[[namespace]]
channels = ["bounded.*"]
max_subscribers = 2
"""
BOUND = 2


@dataclass
class Deployment:
    """The servers of one bus: `nodes[0]` has the server API on `api_port`."""

    bus: str
    nodes: list[Server]
    api_port: int

    def clients(self, sub: str = "alice", *channels: str) -> list[RawClient]:
        """A client of `sub` on each worker of each node, subscribed to `channels`."""
        return [client for node in self.nodes
                for client in every(place(node, 1, sub, channels))]

    def workers(self) -> int:
        return sum(len(node.workers()) for node in self.nodes)


def redis_servers(request: pytest.FixtureRequest, tmp_path: Path, count: int) -> list[str]:
    """`count` redis-servers for this test, killed after it: their URLs."""
    servers = [RedisServer(tmp_path / f"redis-{index}.log") for index in range(count)]
    for server in servers:
        request.addfinalizer(server.kill)
    return [server.url for server in servers]


@pytest.fixture(params=["local", "mesh", "redis", "shards", "cluster"])
def deployment(request: pytest.FixtureRequest, start_server: Any,
               tmp_path: Path) -> Deployment:
    bus = request.param
    namespaces = tmp_path / "namespaces.toml"
    namespaces.write_text(NAMESPACES)
    options = (*OPTIONS, "--config", str(namespaces))
    if bus in ("local", "mesh"):
        node, port = start_api(start_server, *options,
                               "--workers", "1" if bus == "local" else "2")
        node.wait_ready()  # (the mesh: once each worker has reached the other)
        return Deployment(bus, [node], port)
    if bus == "cluster":
        url = request.getfixturevalue("cluster").url
    else:
        url = ",".join(redis_servers(request, tmp_path, 1 if bus == "redis" else 2))
    near, port = start_api(start_server, "--redis", url, *options)
    far = start_server("--redis", url, *options)
    for node in (near, far):
        node.wait_ready()
    return Deployment(bus, [near, far], port)


def test_a_publish_from_each_worker_reaches_every_worker_once_in_order(
        deployment: Deployment) -> None:
    subscribers = deployment.clients("alice", "feed")
    publishers = deployment.clients("bob")
    count = 100
    for n in range(count):
        for index, publisher in enumerate(publishers):
            publisher.publish("feed", [index, n])
    for subscriber in subscribers:
        received = [subscriber.recv_json() for _ in range(count * len(publishers))]
        assert {(message["type"], message["channel"]) for message in received} == {
            ("message", "feed")}
        for index in range(len(publishers)):  # each publisher's order, and each once
            assert [message["data"][1] for message in received
                    if message["data"][0] == index] == list(range(count))
        assert collect(subscriber, 0.3) == []  # and nothing more


def test_echo_false_keeps_the_message_from_its_publisher_only(
        deployment: Deployment) -> None:
    members = deployment.clients("alice", "chat")
    for index, publisher in enumerate(members):
        publisher.publish("chat", f"quiet{index}", echo=False, id=index)
        assert publisher.recv_json() == {"type": "published", "channel": "chat", "id": index}
        publisher.publish("chat", f"loud{index}")
        # the default echoes, and nothing came before it
        assert publisher.recv_json()["data"] == f"loud{index}"
        for other in members:
            if other is not publisher:
                assert [other.recv_json()["data"] for _ in range(2)] == [
                    f"quiet{index}", f"loud{index}"]


def test_subscribed_is_a_promise(deployment: Deployment) -> None:
    """A publish from another worker (or node) right after `subscribed` reaches the
    subscriber: each round a fresh channel, which no worker forwards yet."""
    clients = deployment.clients("alice")
    pairs = list(itertools.permutations(clients, 2)) or [(clients[0], clients[0])]
    for index, (subscriber, publisher) in enumerate(pairs):
        for n in range(30):
            channel = f"fresh.{index}.{n}"
            assert subscribe(subscriber, channel) == {"type": "subscribed", "channel": channel}
            publisher.publish(channel, n)
            message = subscriber.recv_json()
            assert (message["channel"], message["data"]) == (channel, n)


def test_history_offsets_read_and_recovery_after_a_drop(deployment: Deployment) -> None:
    first = deployment.clients("carol")[0]
    reply = subscribe(first, "h.orders")
    assert reply["offset"] == 0 and isinstance(reply["epoch"], str) and reply["epoch"]
    # one order (offsets 1..N, one epoch) for publishers on every worker
    publishers, subscribers = deployment.clients("bob"), deployment.clients("alice")
    interleaved(publishers, subscribers, "h.orders", 50)
    top = 50 * len(publishers)
    assert offsets([first.recv_json() for _ in range(top)]) == list(range(1, top + 1))
    # a publish is answered with its position
    answer = publish(publishers[-1], "h.orders", "last", "p")
    assert answer == {"type": "published", "channel": "h.orders", "id": "p",
                      "offset": top + 1, "epoch": reply["epoch"]}
    top += 1
    # read through the WebSocket and through the API, on every worker
    for reader in deployment.clients("dave"):
        reader.send_json({"type": "history", "channel": "h.orders", "limit": 3})
        read = reader.recv_json()["data"]
        assert (read["offset"], read["epoch"]) == (top, reply["epoch"])
        assert offsets(read["messages"]) == [top - 2, top - 1, top]
    status, read = call(deployment.api_port, "history", {"channel": "h.orders",
                                                         "since": top - 2})
    assert status == 200 and read["result"]["offset"] == top
    assert offsets(read["result"]["messages"]) == [top - 1, top]
    assert read["result"]["messages"][-1]["data"] == "last"
    # a client on the first worker drops while the last node publishes, and recovers on
    # the last worker
    drop_and_recover(deployment.nodes[-1], deployment.clients("erin")[0],
                     lambda: deployment.clients("erin")[-1])


def test_presence_gathered_across_workers(deployment: Deployment) -> None:
    members = deployment.clients("alice", "room") + deployment.clients("bob", "room")
    expected = {"count": len(members), "users": 2}

    def stats(client: RawClient) -> Any:
        client.send_json({"type": "presence_stats", "channel": "room"})
        return client.recv_json()["data"]

    wait_for(lambda: stats(members[0]) == expected, timeout=5)
    for member in members:  # asked on any worker, the answer is the whole room
        assert stats(member) == expected
        member.send_json({"type": "presence", "channel": "room"})
        data = member.recv_json()["data"]
        assert (data["count"], data["users"]) == (len(members), 2)
        assert sorted(entry["user"] for entry in data["clients"]) == sorted(
            ["alice", "bob"] * (len(members) // 2))
    assert call(deployment.api_port, "presence_stats", {"channel": "room"}) == (
        200, {"result": expected})


def test_server_api_channels_info_unsubscribe_disconnect(deployment: Deployment) -> None:
    port = deployment.api_port
    alice = deployment.clients("alice", "room")
    bob = deployment.clients("bob", "room", "other")
    # every node described, with its workers and its connections
    names = {name_of(node): len(node.workers()) for node in deployment.nodes}
    described = wait_for(lambda: (found := nodes(port)) and {
        name: node["connections"] for name, node in found.items()} == {
        name_of(node): 2 * len(node.workers()) for node in deployment.nodes} and found)
    assert {name: node["workers"] for name, node in described.items()} == names
    assert channels(port) == {"room": len(alice) + len(bob), "other": len(bob)}
    assert channels(port, "oth*") == {"other": len(bob)}
    # unsubscribe: bob's subscriptions to room end everywhere, and nothing more of it
    assert call(port, "unsubscribe", {"user": "bob", "channel": "room"}) == (
        200, {"result": {}})
    for client in bob:
        assert client.recv_json() == {"type": "unsubscribed", "channel": "room",
                                      "reason": "server"}
    assert call(port, "publish", {"channel": "room", "data": "room"})[0] == 200
    assert call(port, "publish", {"channel": "other", "data": "other"})[0] == 200
    for client in alice:
        assert client.recv_json()["data"] == "room"
    for client in bob:
        assert client.recv_json()["data"] == "other"
    wait_for(lambda: channels(port) == {"room": len(alice), "other": len(bob)})
    # disconnect: every connection of alice, on every worker and node, closes
    assert call(port, "disconnect", {"user": "alice"}) == (200, {"result": {}})
    for client in alice:
        closed_by_api(client)
    for client in bob:
        assert alive(client)


def test_ready(deployment: Deployment) -> None:
    for node in deployment.nodes:
        status, _, body = node.get("/ready")
        assert (status, body) == (200, b"ready\n")


def test_a_cache_channel_gives_its_latest_message_on_subscribe_and_on_recovery(
        deployment: Deployment) -> None:
    # kept with nobody subscribed: a publish from the server API, then one from a client
    assert call(deployment.api_port, "publish", {"channel": "cached.price", "data": 1})[0] \
        == 200
    publisher = deployment.clients("bob")[-1]
    answer = publish(publisher, "cached.price", 2, "p")
    assert answer["offset"] == 2
    epoch = answer["epoch"]
    # a subscriber on each worker of each node: `subscribed`, then the latest, marked
    subscribers = deployment.clients("alice")
    for client in subscribers:
        reply = subscribe(client, "cached.price")
        assert (reply["offset"], reply["epoch"]) == (2, epoch) and "recovered" not in reply
        cached = client.recv_json()
        assert {key: cached[key] for key in ("type", "channel", "data", "offset", "cached")} \
            == {"type": "message", "channel": "cached.price", "data": 2, "offset": 2,
                "cached": True}
        assert collect(client, 0.1) == []
    publish(publisher, "cached.price", 3, "q")
    for client in subscribers:
        assert "cached" not in client.recv_json()  # what comes live is not marked
    # recovering: one that holds an older offset gets the latest only, marked; one that
    # holds the latest gets nothing
    for client in deployment.clients("carol"):
        reply = subscribe(client, "cached.price", recover={"offset": 1, "epoch": epoch})
        assert (reply["offset"], reply["recovered"]) == (3, True)
        message = client.recv_json()
        assert (message["data"], message["offset"], message["cached"]) == (3, 3, True)
        assert collect(client, 0.1) == []
    for client in deployment.clients("dave"):
        reply = subscribe(client, "cached.price", recover={"offset": 3, "epoch": epoch})
        assert (reply["offset"], reply["recovered"]) == (3, True)
        assert collect(client, 0.1) == []
    # an empty cache channel: subscribed at 0, nothing follows
    client = deployment.clients("erin")[0]
    assert subscribe(client, "cached.empty")["offset"] == 0
    assert collect(client, 0.1) == []


def test_a_namespace_keeps_its_own_history_size(deployment: Deployment) -> None:
    publisher = deployment.clients("bob")[-1]
    for n in range(5):
        publish(publisher, "short.log", n, n)
        publish(publisher, "h.long", n, n)  # the global 2000
    for reader in deployment.clients("alice"):
        for channel, kept in (("short.log", [3, 4, 5]), ("h.long", [1, 2, 3, 4, 5])):
            reader.send_json({"type": "history", "channel": channel, "limit": 10})
            assert offsets(reader.recv_json()["data"]["messages"]) == kept
    status, read = call(deployment.api_port, "history", {"channel": "short.log"})
    assert status == 200 and offsets(read["result"]["messages"]) == [3, 4, 5]


def test_a_namespace_bounds_the_subscribers_of_a_channel_across_the_deployment(
        deployment: Deployment) -> None:
    pool = deployment.clients("alice") + deployment.clients("bob") + deployment.clients("carol")
    inside = pool[:BOUND]  # on different workers or nodes where there are several
    for client in inside:
        assert subscribe(client, "bounded.room") == {"type": "subscribed",
                                                     "channel": "bounded.room"}
    # (counted once presence has them: on Redis, within the loop turn's write)
    wait_for(lambda: _subscribers(inside[0], "bounded.room") == BOUND)
    for client in pool[BOUND:]:
        client.send_json({"type": "subscribe", "channel": "bounded.room", "id": 1})
        assert client.recv_json() == {
            "type": "error", "code": 429, "id": 1,
            "message": "bounded.room is full: 2 subscribers (its namespace's max_subscribers)"}
    # another channel of the namespace has its own bound; a repeat subscribe is no more
    assert subscribe(pool[-1], "bounded.other")["type"] == "subscribed"
    assert subscribe(inside[0], "bounded.room")["type"] == "subscribed"
    # one leaves: one more may come in, and only one, though several try at once
    inside[0].send_json({"type": "unsubscribe", "channel": "bounded.room"})
    assert inside[0].recv_json()["type"] == "unsubscribed"

    def one_more_in() -> bool:
        pool[-1].send_json({"type": "subscribe", "channel": "bounded.room"})
        return bool(pool[-1].recv_json()["type"] == "subscribed")

    wait_for(one_more_in)
    # one place free again, and four clients of one worker ask for it at once
    inside[1].send_json({"type": "unsubscribe", "channel": "bounded.room"})
    assert inside[1].recv_json()["type"] == "unsubscribed"
    wait_for(lambda: _subscribers(inside[1], "bounded.room") == BOUND - 1)
    burst = next(iter(place(deployment.nodes[0], 4, "grace").values()))
    for client in burst:
        client.send_json({"type": "subscribe", "channel": "bounded.room"})
    assert sorted(client.recv_json()["type"] for client in burst) == [
        "error", "error", "error", "subscribed"]


def _subscribers(client: RawClient, channel: str) -> int:
    client.send_json({"type": "presence_stats", "channel": channel})
    return int(client.recv_json()["data"]["count"])
