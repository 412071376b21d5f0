"""History and recovery: offsets and epochs, one order per channel, and a client that comes
back after a drop receives what it missed exactly once, or is told it cannot.

Every test runs real servers (several workers, or two nodes on one real redis-server) and
raw clients; the publishers keep publishing while a client drops and recovers, so the seam
between the missed messages and the live ones is tested under traffic.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import pytest
from support.messages import HISTORY, drop_and_recover, interleaved, offsets, subscribe
from support.processes import children
from support.redis import RedisServer
from support.server import Server, token
from support.waiting import collect, wait_for
from support.wire import RawClient
from support.workers import every, one_per_worker, place


@pytest.mark.slow
def test_messages_carry_offsets_and_epochs_and_replies_the_position(server_with: Any) -> None:
    server = server_with("--history-size", "3")
    client = server.connect()
    reply = subscribe(client, "h", id=1)
    assert reply["offset"] == 0 and isinstance(reply["epoch"], str) and reply["epoch"]
    epoch = reply["epoch"]
    for n in range(5):
        client.publish("h", n, id=f"p{n}")
        # (the message and the acknowledgement, in whichever order the bus gives them)
        replies = {reply["type"]: reply for reply in (client.recv_json(), client.recv_json())}
        assert replies["published"] == {"type": "published", "channel": "h", "id": f"p{n}",
                                        "offset": n + 1, "epoch": epoch}
        message = replies["message"]
        assert (message["data"], message["offset"], message["epoch"]) == (n, n + 1, epoch)
    # The last three are kept: the last `limit`, or the first `limit` after `since`.
    client.send_json({"type": "history", "channel": "h", "limit": 2, "id": 7})
    answer = client.recv_json()
    assert answer["id"] == 7 and answer["data"]["offset"] == 5
    assert offsets(answer["data"]["messages"]) == [4, 5]
    client.send_json({"type": "history", "channel": "h", "since": 2, "epoch": epoch})
    assert offsets(client.recv_json()["data"]["messages"]) == [3, 4, 5]
    client.send_json({"type": "history", "channel": "h", "limit": 100})  # clamped to 3
    assert offsets(client.recv_json()["data"]["messages"]) == [3, 4, 5]
    client.send_json({"type": "history", "channel": "h", "since": 2, "epoch": "other"})
    error = client.recv_json()
    assert (error["type"], error["code"]) == ("error", 409)
    # Recovery: from 3, kept; from 1, message 2 is gone: not recovered, live from 5.
    other = server.connect()
    assert subscribe(other, "h", recover={"offset": 3, "epoch": epoch}) == {
        "type": "subscribed", "channel": "h", "offset": 5, "epoch": epoch, "recovered": True}
    assert offsets(collect(other, 0.5)) == [4, 5]
    late = server.connect()
    assert subscribe(late, "h", recover={"offset": 1, "epoch": epoch})["recovered"] is False
    assert subscribe(server.connect(), "h", recover={"offset": 5, "epoch": "x"})[
        "recovered"] is False
    assert collect(late, 0.3) == []


@pytest.fixture
def server_with(start_server: Any) -> Any:
    return start_server


@pytest.mark.slow
def test_bad_input(server_with: Any) -> None:
    server = server_with("--history-size", "10", "--history-channels", "h.*")
    client = server.connect()
    bad = [
        {"type": "subscribe", "channel": "h.a", "recover": {"offset": "1", "epoch": "e"}},
        {"type": "subscribe", "channel": "h.a", "recover": 5},
        {"type": "subscribe", "channel": "h.a", "recover": {"epoch": "e"}},
        {"type": "subscribe", "channel": "h.a", "recover": {"offset": -1, "epoch": "e"}},
        {"type": "history", "channel": "h.a", "since": "3"},
        {"type": "history", "channel": "h.a", "limit": -2},
        {"type": "history", "channel": "h.a", "epoch": 5},
    ]
    for request in bad:
        client.send_json(request)
        error = client.recv_json()
        assert (error["type"], error["code"]) == ("error", 400), (request, error)
    # The connection lives on; a channel without history has none to give, no offsets.
    client.send_json({"type": "history", "channel": "plain", "id": 1})
    assert client.recv_json() == {"type": "history", "channel": "plain", "id": 1,
                                  "data": {"offset": 0, "epoch": "", "messages": []}}
    assert subscribe(client, "plain") == {"type": "subscribed", "channel": "plain"}
    client.publish("plain", 1)
    assert "offset" not in client.recv_json()
    # Not permitted to read what one may not subscribe to.
    limited = RawClient(server.host, server.port,
                        "/?token=" + token("bob", subscribe=["x.*"]))
    limited.recv_json()
    limited.send_json({"type": "history", "channel": "h.a"})
    assert limited.recv_json()["code"] == 403


@pytest.mark.slow
def test_one_order_across_workers(server_with: Any) -> None:
    server = server_with("--workers", "2", *HISTORY)
    first, second = one_per_worker(server).values()
    third, fourth = one_per_worker(server, "bob").values()
    interleaved([first, second], [third, fourth], "orders", 300)


@pytest.mark.slow
def test_one_order_across_nodes(server_with: Any, redis_server: RedisServer) -> None:
    near = server_with("--redis", redis_server.url, *HISTORY)
    far = server_with("--redis", redis_server.url, *HISTORY)
    near.wait_ready()
    far.wait_ready()
    interleaved([near.connect(), far.connect()], [near.connect(), far.connect()], "orders",
                300)


@pytest.mark.slow
def test_nodes_with_different_history_sizes_on_one_redis_say_so(
        server_with: Any, redis_server: RedisServer) -> None:
    """Offsets on one node's messages and none on the other's: each node logs one warning
    naming both sizes, the one started second and the one running already (one line per
    node, whatever its workers)."""
    keeping = server_with("--redis", redis_server.url, "--history-size", "100")
    keeping.wait_ready()
    plain = server_with("--redis", redis_server.url, "--workers", "2")
    plain.wait_ready()
    name = {node: f"{socket.gethostname()}:{node.port}" for node in (keeping, plain)}

    def warnings(node: Server) -> list[str]:
        return [line for line in node.log().splitlines() if "--history-size" in line]

    for node, other, sizes in ((plain, keeping, (100, 0)), (keeping, plain, (0, 100))):
        (line,) = wait_for(lambda node=node: warnings(node))
        assert (f"node {name[other]} runs with --history-size {sizes[0]}, this node "
                f"({name[node]}) with --history-size {sizes[1]}") in line

    def announced(node: Server) -> float:
        """When the node's worker 0 last wrote its registry entry (and compared, after)."""
        reply = redis_server.command("ZSCORE", "{fastfan:nodes}:seen", f"{name[node]}/0")
        return float(reply.split(b"\r\n")[1])

    for node in (keeping, plain):  # compared again and again since: still one line
        seen = announced(node)
        wait_for(lambda node=node, seen=seen: announced(node) > seen + 2)
        assert len(warnings(node)) == 1
    same = server_with("--redis", redis_server.url, "--history-size", "100")
    same.wait_ready()
    wait_for(lambda: len(warnings(same)) == 1)  # of plain only: keeping keeps the same
    assert name[plain] in warnings(same)[0]


@pytest.mark.slow
def test_recovery_on_another_worker(server_with: Any) -> None:
    server = server_with("--workers", "2", *HISTORY)
    held = one_per_worker(server)
    first_pid, first = next(iter(held.items()))

    def on_the_other_worker() -> RawClient:
        others = [pid for pid in server.workers() if pid != first_pid]
        return every(place(server, workers=others))[0]

    drop_and_recover(server, first, on_the_other_worker)


@pytest.mark.slow
def test_recovery_on_another_node(server_with: Any, redis_server: RedisServer) -> None:
    near = server_with("--redis", redis_server.url, *HISTORY)
    far = server_with("--redis", redis_server.url, *HISTORY)
    near.wait_ready()
    far.wait_ready()
    drop_and_recover(near, near.connect(), far.connect)


@pytest.mark.slow
def test_history_survives_fastfan_restarts(server_with: Any, redis_server: RedisServer) -> None:
    server = server_with("--redis", redis_server.url, "--history-size", "10")
    server.wait_ready()
    client = server.connect()
    reply = subscribe(client, "kept")
    for n in range(5):
        client.publish("kept", n)
    assert offsets(collect(client, 0.5)) == [1, 2, 3, 4, 5]
    assert server.stop() == 0
    restarted = server_with("--redis", redis_server.url, "--history-size", "10")
    restarted.wait_ready()
    again = restarted.connect()
    assert subscribe(again, "kept", recover={"offset": 2, "epoch": reply["epoch"]}) == {
        "type": "subscribed", "channel": "kept", "offset": 5, "epoch": reply["epoch"],
        "recovered": True}
    assert [message["data"] for message in collect(again, 0.5)] == [2, 3, 4]


@pytest.mark.slow
def test_redis_flushed_means_a_new_epoch(server_with: Any, redis_server: RedisServer) -> None:
    server = server_with("--redis", redis_server.url, "--history-size", "10")
    server.wait_ready()
    client = server.connect()
    reply = subscribe(client, "lost")
    client.publish("lost", 1)
    client.publish("lost", 2)
    assert offsets(collect(client, 0.5)) == [1, 2]
    redis_server.command("FLUSHALL")
    client.publish("lost", 3)
    message = client.recv_json()
    assert message["offset"] == 1 and message["epoch"] != reply["epoch"]
    other = server.connect()
    assert subscribe(other, "lost", recover={"offset": 2, "epoch": reply["epoch"]}) == {
        "type": "subscribed", "channel": "lost", "offset": 1, "epoch": message["epoch"],
        "recovered": False}
    # And a Redis that restarts empty: the same.
    redis_server.kill()
    redis_server.start()
    server.wait_ready(timeout=15)
    third = server.connect()
    assert subscribe(third, "lost", recover={"offset": 1, "epoch": message["epoch"]})[
        "recovered"] is False


@pytest.mark.slow
def test_a_dead_owner_costs_a_new_epoch(server_with: Any) -> None:
    server = server_with("--workers", "2", "--history-size", "10")
    first, second = one_per_worker(server).values()
    reply = subscribe(first, "owned")
    subscribe(second, "owned")
    first.publish("owned", 1)
    assert first.recv_json()["offset"] == second.recv_json()["offset"] == 1
    killed = children(server.process.pid)
    for pid in killed:
        os.kill(pid, signal.SIGKILL)  # the owner among them

    def replaced() -> bool:
        try:  # (a killed worker's socket may still take the connection, and reset it)
            workers = children(server.process.pid)
            return (len(workers) == 2 and not set(workers) & set(killed)
                    and server.get("/ready")[0] == 200)
        except OSError:
            return False

    wait_for(replaced, timeout=15)
    again = server.connect()

    def resumed() -> dict[str, Any] | None:
        again.send_json({"type": "subscribe", "channel": "owned",
                         "recover": {"offset": 1, "epoch": reply["epoch"]}})
        answer: dict[str, Any] = again.recv_json()
        if answer["type"] == "error":  # 503 while the workers find each other again
            assert answer["code"] == 503, answer
            return None
        return answer

    answer = wait_for(resumed, timeout=10, interval=0.2)
    assert answer["recovered"] is False and answer["epoch"] != reply["epoch"]


@pytest.mark.slow
def test_expired_messages_keep_the_offsets(server_with: Any,
                                           redis_server: RedisServer) -> None:
    for extra in ((), ("--redis", redis_server.url)):
        server = server_with("--history-size", "10", "--history-ttl", "1", *extra)
        server.wait_ready()
        client = server.connect()
        reply = subscribe(client, "brief")
        client.publish("brief", 1)
        client.publish("brief", 2)
        assert offsets(collect(client, 0.3)) == [1, 2]

        def kept(client: RawClient = client) -> dict[str, Any]:
            client.send_json({"type": "history", "channel": "brief"})
            return dict(client.recv_json()["data"])

        # until past the TTL (Redis counts it in whole seconds)
        expired = wait_for(lambda: (data := kept())["messages"] == [] and data, timeout=5)
        assert expired == {"offset": 2, "epoch": reply["epoch"], "messages": []}
        # Missed nothing: recovered; missed an expired one: not.
        assert subscribe(server.connect(), "brief", recover={
            "offset": 2, "epoch": reply["epoch"]})["recovered"] is True
        assert subscribe(server.connect(), "brief", recover={
            "offset": 1, "epoch": reply["epoch"]})["recovered"] is False
        client.publish("brief", 3)
        assert client.recv_json()["offset"] == 3  # offsets go on, in the same epoch
        server.stop()


@pytest.mark.slow
def test_bare_redis_publish_does_not_break_the_offsets(server_with: Any,
                                                       redis_server: RedisServer) -> None:
    server = server_with("--redis", redis_server.url, "--history-size", "10")
    server.wait_ready()
    client = server.connect()
    subscribe(client, "mixed")
    client.publish("mixed", 1)
    assert client.recv_json()["offset"] == 1
    redis_server.command("PUBLISH", "fastfan:mixed",
                         '{"type":"message","channel":"mixed","data":"bare"}')
    bare = client.recv_json()
    assert bare["data"] == "bare" and "offset" not in bare
    client.publish("mixed", 2)
    assert client.recv_json()["offset"] == 2
    client.send_json({"type": "history", "channel": "mixed"})
    assert offsets(client.recv_json()["data"]["messages"]) == [1, 2]  # not kept
