"""A real six-node Redis Cluster (three masters, three replicas) made by the tests, and
fastfan on it with sharded pub/sub: channels on their slot's master, a slot moved to
another master, a master killed and its replica taking over; history and recovery on the
channel's master, and the server API's `channels` and `info` across the nodes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot
from support.api import call, channels, name_of, nodes, start_api, two_nodes_add_up
from support.messages import (
    HISTORY,
    alive,
    ask,
    closed_by_api,
    drop_and_recover,
    each_reaches_every_listener,
    interleaved,
    offsets,
    publish,
    subscribe,
)
from support.redis import Cluster, cluster_ports, query
from support.server import Server
from support.waiting import assert_received_by_all, collect, wait_for

pytestmark = pytest.mark.slow  # failovers that take the cluster seconds each

# tests/apps/chat.py: its on_message("orders.*") publishes a receipt on `receipts`
CHAT = ("--app", "apps.chat:app", "--workers", "2")
ON_PATH = {"PYTHONPATH": str(Path(__file__).parent)}


def nodes_on(start_server: Any, cluster: Cluster, *args: str) -> list[Server]:
    servers = [start_server("--redis", cluster.url, *args) for _ in range(2)]
    for server in servers:
        server.wait_ready()
    return servers


def on_each_master(cluster: Cluster, per_master: int, stem: str = "ch") -> list[str]:
    """Channel names, `per_master` of them on each master."""
    by_owner: dict[int, list[str]] = {}
    for n in range(1000):
        name = f"{stem}{n}"
        held = by_owner.setdefault(cluster.owner(name).port, [])
        if len(held) < per_master:
            held.append(name)
        if len(by_owner) == 3 and all(len(v) == per_master for v in by_owner.values()):
            break
    return [name for names in by_owner.values() for name in names]


def test_channels_on_the_master_of_their_slot(start_server: Any, cluster: Cluster) -> None:
    near, far = nodes_on(start_server, cluster, "--workers", "2")
    names = on_each_master(cluster, 2)
    # the documented hash (the shards' too) is the cluster's own slot
    assert [query(cluster.nodes[0], "CLUSTER", "KEYSLOT", f"fastfan:{name}")
            for name in names] == [key_slot(f"fastfan:{name}".encode()) for name in names]
    listeners = [server.connect().subscribe(*names) for server in (near, far)]
    for name in names:
        wait_for(lambda name=name: cluster.subscribers(name) == 2)
    publisher = near.connect()
    each_reaches_every_listener(publisher, listeners, names)
    message = b'{"type":"message","channel":"%s","data":"backend"}' % names[0].encode()
    assert cluster.owner(names[0]).command("SPUBLISH", f"fastfan:{names[0]}", message) == (
        b":2\r\n")
    for listener in listeners:
        assert listener.recv_json()["data"] == "backend"
    # presence, its keys hash-tagged by channel, through the cluster
    listeners[1].send_json({"type": "presence_stats", "channel": names[0]})
    assert listeners[1].recv_json()["data"] == {"count": 2, "users": 1}
    # server API commands: SPUBLISHed on their slot's master, which every worker listens on
    bob = [server.connect("bob") for server in (near, far)]
    command = b'{"command":"disconnect","user":"bob"}'
    assert cluster.owner("!commands").command("SPUBLISH", "fastfan:!commands", command) == (
        b":4\r\n")  # every worker (two) of both nodes
    for client in bob:
        closed_by_api(client)
    assert alive(listeners[0])


def test_a_slot_moved_to_another_master_takes_its_subscriptions(
        start_server: Any, cluster: Cluster) -> None:
    near, far = nodes_on(start_server, cluster, "--publish-rate", "1000000")
    name = on_each_master(cluster, 1)[0]
    listeners = [server.connect().subscribe(name) for server in (near, far)]
    wait_for(lambda: cluster.subscribers(name) == 2)
    source = cluster.owner(name)
    target = next(node for node in cluster.nodes
                  if node is not source and cluster.masters_seen_by(node).get(
                      query(node, "CLUSTER", "MYID").decode()) == node.port)
    slot, target_id = str(key_slot(f"fastfan:{name}".encode())), query(target, "CLUSTER", "MYID")
    query(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", query(source, "CLUSTER", "MYID"))
    query(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    publisher = near.connect()
    for node in (target, source):  # the source pushes sunsubscribe to its subscribers
        query(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    # at once: the first may meet MOVED (503), and the map is read again
    refused, deadline = [], time.monotonic() + 10
    while (reply := publish(publisher, name, "moved", 1))["type"] != "published":
        refused.append(reply["code"])  # until both nodes have had time to follow the slot
        assert time.monotonic() < deadline
    assert set(refused) <= {503}
    wait_for(lambda: query(target, "PUBSUB", "SHARDNUMSUB", f"fastfan:{name}")[1] == 2)
    assert query(source, "PUBSUB", "SHARDNUMSUB", f"fastfan:{name}")[1] == 0
    for listener in listeners:
        assert listener.recv_json()["data"] == "moved"
    print(f"{len(refused)} publishes refused while the slot moved")


def test_a_master_killed_its_replica_takes_over_nothing_acknowledged_lost(
        start_server: Any, cluster: Cluster) -> None:
    # The listeners read only at the end: what 9 s of publishing sends them waits in the
    # server (within --max-buffer) and their 1 MiB receive buffers meanwhile.
    near, far = nodes_on(start_server, cluster, "--publish-rate", "1000000",
                         "--max-buffer", str(64 << 20))
    names = on_each_master(cluster, 2, "f")
    listeners = [server.connect(receive_buffer=1 << 20).subscribe(*names)
                 for server in (near, far)]
    for name in names:
        wait_for(lambda name=name: cluster.subscribers(name) == 2)
    victim = cluster.owner(names[0])
    gone = {name for name in names if cluster.owner(name) is victim}
    publisher = near.connect()
    acknowledged: set[int] = set()
    refused: set[int] = set()
    started, killed = time.monotonic(), False
    sequence = 0
    while time.monotonic() - started < 9:
        if time.monotonic() - started > 0.3 and not killed:
            victim.kill()
            killed = True
        reply = publish(publisher, names[sequence % len(names)], sequence, sequence)
        (acknowledged if reply["type"] == "published" else refused).add(sequence)
        sequence += 1
    # the dead master's channels failed, then took publishes on its replica; the others
    # never stopped
    assert {names[n % len(names)] for n in refused} == gone
    after = max(refused)
    assert len({n for n in acknowledged if n > after and names[n % len(names)] in gone}) > 100
    assert_received_by_all(listeners, acknowledged)
    assert near.get("/ready")[0] == 200
    print(f"{len(acknowledged)} acknowledged and delivered to both nodes, "
          f"{len(refused)} refused (503)")


def test_a_cluster_unreachable_at_start(start_server: Any, tmp_path: Path) -> None:
    ports = cluster_ports(6)
    node = start_server("--redis", "redis+cluster://" + ",".join(
        f"127.0.0.1:{port}" for port in ports[:2]))
    assert node.get("/health")[0] == 200
    status, _, body = node.get("/ready")
    assert (status, body) == (503, b"redis down: redis cluster (no slot map yet)\n")
    client = node.connect()
    assert publish(client, "early", 1, 1)["code"] == 503
    cluster = Cluster(tmp_path, ports)
    try:
        node.wait_ready(timeout=10)
        listener = node.connect().subscribe("early")
        assert publish(client, "early", 2, 2)["type"] == "published"
        assert listener.recv_json()["data"] == 2
    finally:
        cluster.kill()


def test_history_on_the_channels_master(start_server: Any, cluster: Cluster) -> None:
    """One order across two nodes, the kept messages read (WebSocket and API) on the
    channel's master, and a client that drops recovers exactly while another node goes on
    publishing."""
    near, port = start_api(start_server, "--redis", cluster.url, *HISTORY)
    far = start_server("--redis", cluster.url, *HISTORY)
    near.wait_ready()
    far.wait_ready()
    interleaved([near.connect(), far.connect()], [near.connect(), far.connect()], "orders",
                100)
    owner = cluster.owner("orders")  # its keys, hash-tagged by the channel, are there
    assert query(owner, "XLEN", "{fastfan:orders}:history") == 200
    client = near.connect()
    client.send_json({"type": "history", "channel": "orders", "limit": 3})
    answer = client.recv_json()["data"]
    assert answer["offset"] == 200 and offsets(answer["messages"]) == [198, 199, 200]
    # a channel nobody subscribes to on the node asked
    publisher = far.connect()
    replies = [publish(publisher, "quiet", n, n) for n in range(3)]
    assert [(reply["offset"], reply["epoch"]) for reply in replies] == [
        (n, replies[0]["epoch"]) for n in (1, 2, 3)]
    status, read = call(port, "history", {"channel": "quiet", "since": 1})
    assert status == 200 and read["result"]["offset"] == 3
    assert [message["data"] for message in read["result"]["messages"]] == [1, 2]
    drop_and_recover(far, near.connect(), near.connect)
    # the reply channels of the reads are left once answered
    for node in cluster.nodes:
        wait_for(lambda node=node: query(node, "PUBSUB", "SHARDCHANNELS", "*!history:*") == [])


def test_everything_naming_a_channel_is_in_its_slot(start_server: Any, cluster: Cluster) -> None:
    """A channel's pub/sub channel, presence keys and history keys are in one slot, on one
    master: its state fails over in one step. (Presence was tagged by the bare name, `{C}`:
    another slot, most often on another master.)"""
    server = start_server("--redis", cluster.url, *HISTORY)
    server.wait_ready()
    member = server.connect()
    subscribe(member, "ledger")  # present: its presence keys are written
    assert publish(server.connect(), "ledger", 1, 1)["offset"] == 1  # its history's
    owner = cluster.owner("ledger")
    slot = query(owner, "CLUSTER", "KEYSLOT", "fastfan:ledger")
    assert slot == key_slot(b"fastfan:ledger")
    assert query(owner, "PUBSUB", "SHARDCHANNELS", "*ledger*") == [b"fastfan:ledger"]

    def named() -> list[bytes] | None:
        """The keys naming the channel, wherever they are: its history's two and presence's
        two, once written."""
        found = {key for node in cluster.nodes if node.process is not None
                 for key in query(node, "KEYS", "*ledger*")}
        return sorted(found) if len(found) == 4 else None

    keys = wait_for(named)
    assert {key: query(owner, "CLUSTER", "KEYSLOT", key) for key in keys} == {
        key: slot for key in keys}
    assert sorted(query(owner, "KEYS", "*ledger*")) == keys == [
        b"{fastfan:ledger}:epoch", b"{fastfan:ledger}:history", b"{fastfan:ledger}:presence",
        b"{fastfan:ledger}:presence:expiry"]
    member.close()


def test_a_master_failover_starts_a_new_epoch(start_server: Any, cluster: Cluster) -> None:
    """Its replica may have missed the master's last writes (replication is asynchronous):
    a client is never told `recovered:true` across it, even when it missed none."""
    near, far = nodes_on(start_server, cluster, "--publish-rate", "1000000", *HISTORY)
    client = near.connect()
    before = subscribe(client, "kept")
    for n in range(3):
        client.publish("kept", n)
    assert offsets(collect(client, 0.5)) == [1, 2, 3]
    owner = cluster.owner("kept")
    wait_for(lambda: cluster.replicated(owner), timeout=15)
    owner.kill()
    publisher, deadline = far.connect(), time.monotonic() + 20
    while publish(publisher, "kept", "after", 1)["type"] != "published":  # 503 meanwhile
        assert time.monotonic() < deadline
    after = client.recv_json()
    assert (after["data"], after["offset"]) == ("after", 1)
    assert after["epoch"] != before["epoch"]
    assert subscribe(far.connect(), "kept", recover={"offset": 3, "epoch": before["epoch"]}
                     ) == {"type": "subscribed", "channel": "kept", "offset": 1,
                           "epoch": after["epoch"], "recovered": False}


def test_channels_and_info_across_nodes(start_server: Any, cluster: Cluster) -> None:
    """The registry and the queries on their slots' masters, which every worker of every
    node subscribes to."""
    near, port, far, _, alice = two_nodes_add_up(start_server, cluster.url)
    assert far.stop() == 0  # it leaves `info` at once
    assert list(nodes(port)) == [name_of(near)]
    assert channels(port) == {"room": 1}
    alice.close()


def test_on_message_runs_once_per_node_on_the_channels_clients_subscribe_to(
        start_server: Any, cluster: Cluster) -> None:
    """Sharded pub/sub has no patterns: each node's first worker subscribes to the
    matching channels some client of the deployment subscribes to, and hears every
    message there, whoever published it; once nobody subscribes, neither does it."""
    near, far = (start_server("--redis", cluster.url, *CHAT, env=ON_PATH) for _ in range(2))
    near.wait_ready()
    far.wait_ready()
    watcher, publisher, subscriber = near.connect("watcher"), near.connect("bob"), far.connect()
    assert ask(watcher, {"type": "subscribe", "channel": "receipts"})["type"] == "subscribed"
    assert ask(subscriber, {"type": "subscribe", "channel": "orders.tea"})["type"] == (
        "subscribed")
    probes = iter(range(1000))

    def heard_by_both_nodes() -> bool:  # once both nodes' first workers subscribe there
        probe = next(probes)
        publisher.publish("orders.tea", {"item": probe})
        receipts = [m["data"]["order"]["item"] for m in collect(watcher, 0.3)]
        return receipts.count(probe) == 2

    wait_for(heard_by_both_nodes)
    bob = ask(publisher, {"type": "rpc", "method": "whoami"})["data"]["clientId"]
    publisher.publish("orders.tea", {"item": "sencha"})
    assert ask(publisher, {"type": "rpc", "method": "publish", "data": {
        "channel": "orders.tea", "data": {"item": "scone"}}})["type"] == "rpc_result"
    assert cluster.owner("orders.tea").command(
        "SPUBLISH", "fastfan:orders.tea", '{"type":"message","channel":"orders.tea",'
        '"data":{"item":"bare"},"from":"backend","timestamp":1}') != b":0\r\n"
    receipts = [message["data"] for message in collect(watcher, 1.0)
                if message["data"]["order"]["item"] in ("sencha", "scone", "bare")]
    assert sorted((r["order"]["item"], r["from"]) for r in receipts) == sorted(
        [("sencha", bob), ("scone", "server"), ("bare", "backend")] * 2)
    subscriber.close()
    wait_for(lambda: cluster.subscribers("orders.tea") == 0)
