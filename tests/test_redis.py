"""Nodes sharing channels through a real redis-server, which the tests kill and restart."""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import pytest
from support.messages import publish
from support.redis import RedisServer
from support.server import Server
from support.waiting import wait_for
from support.wire import free_port


def node_on(redis: RedisServer, start_server: Any, *args: str) -> Server:
    """A fastfan node on `redis`, once it is ready (its workers have reached Redis)."""
    node = start_server("--redis", redis.url, *args)
    node.wait_ready()
    return node


@pytest.mark.slow
def test_two_nodes_deliver_to_each_others_subscribers_in_order(
        start_server: Any, redis_server: RedisServer) -> None:
    first = node_on(redis_server, start_server)
    second = node_on(redis_server, start_server, "--workers", "2")
    near, far = first.connect().subscribe("shared"), second.connect().subscribe("shared")
    wait_for(lambda: redis_server.subscribers("shared") == 2)
    for node in (first, second):
        publisher = node.connect()
        for i in range(500):
            publisher.publish("shared", i)
        for client in (near, far):
            assert [client.recv_json()["data"] for _ in range(500)] == list(range(500))
        publisher.close()


@pytest.mark.slow
def test_one_redis_subscription_per_channel_dropped_with_the_last(
        start_server: Any, redis_server: RedisServer) -> None:
    node = node_on(redis_server, start_server)
    a, b = node.connect().subscribe("room"), node.connect().subscribe("room")
    wait_for(lambda: redis_server.subscribers("room") == 1)
    for client in (a, b):
        client.send_json({"type": "unsubscribe", "channel": "room"})
        assert client.recv_json()["type"] == "unsubscribed"
    wait_for(lambda: redis_server.subscribers("room") == 0)
    # A burst of subscribes goes out as one SUBSCRIBE command.
    before = _subscribe_calls(redis_server)
    burst = node.connect()
    burst.send_json_burst([{"type": "subscribe", "channel": f"burst{n}"} for n in range(100)])
    for _ in range(100):
        burst.recv_json()
    wait_for(lambda: redis_server.subscribers("burst99") == 1)
    assert _subscribe_calls(redis_server) - before <= 2  # one per loop turn that read some


def _subscribe_calls(redis: RedisServer) -> int:
    stats = redis.command("INFO", "commandstats").decode()
    found = re.search(r"cmdstat_subscribe:calls=(\d+)", stats)
    return int(found.group(1)) if found else 0


@pytest.mark.slow
def test_a_backend_publishes_through_redis(start_server: Any, redis_server: RedisServer) -> None:
    node = node_on(redis_server, start_server)
    client = node.connect().subscribe("news")
    wait_for(lambda: redis_server.subscribers("news") == 1)
    message = '{"type":"message","channel":"news","data":{"headline":"hi"},"from":"backend",' \
              '"timestamp":1700000000000}'
    assert redis_server.command("PUBLISH", "fastfan:news", message) == b":1\r\n"
    _, _, payload = client.recv_frame()
    assert payload.decode() == message


def test_payloads_that_are_not_json_objects_are_dropped_and_counted(
        start_server: Any, redis_server: RedisServer) -> None:
    node = node_on(redis_server, start_server)
    client = node.connect().subscribe("news")
    wait_for(lambda: redis_server.subscribers("news") == 1)
    for bad in (b"not json", b"[1,2]", b'"text"', b"{\"a\":", b"\xff\xfe"):
        redis_server.command("PUBLISH", "fastfan:news", bad)
    redis_server.command("PUBLISH", "fastfan:news", b'{"type":"message","data":"good"}')
    assert client.recv_json()["data"] == "good"
    invalid = 'fastfan_dropped_total{reason="invalid_payload"}'
    figures = wait_for(lambda: (m := node.metrics())[invalid] == 5 and m)
    assert figures["fastfan_redis_up"] == 1


@pytest.mark.slow
def test_redis_restart_refuses_meanwhile_then_resumes(
        start_server: Any, redis_server: RedisServer) -> None:
    first, second = node_on(redis_server, start_server), node_on(redis_server, start_server)
    near, far = first.connect().subscribe("live"), second.connect().subscribe("live")
    wait_for(lambda: redis_server.subscribers("live") == 2)
    publisher = first.connect()
    assert publish(publisher, "live", "before", 1) == {
        "type": "published", "channel": "live", "id": 1}  # Redis has taken it
    for client in (near, far):
        assert client.recv_json()["data"] == "before"

    redis_server.kill()
    refused = wait_for(lambda: (r := publish(publisher, "live", "during", 2))["type"] == "error"
                       and r, timeout=5)
    assert (refused["code"], refused["id"]) == (503, 2)
    assert first.get("/ready")[0] == 503 and first.get("/health")[0] == 200
    assert wait_for(lambda: first.metrics()["fastfan_redis_up"] == 0)

    redis_server.start()
    restarted = time.monotonic()
    wait_for(lambda: redis_server.subscribers("live") == 2, timeout=3)
    reply = wait_for(lambda: (r := publish(publisher, "live", "after", 3))["type"] == "published"
                     and r, timeout=3)
    assert reply["id"] == 3
    for client in (near, far):  # nothing refused arrives; the first thing after is "after"
        assert client.recv_json()["data"] == "after"
    assert time.monotonic() - restarted < 3
    assert first.get("/ready")[0] == 200
    assert "Traceback" not in first.log() + second.log()
    downs = [line for line in first.log().splitlines() if "redis down" in line]
    assert len(downs) == 1  # one line per change of state, not per retry


@pytest.mark.slow
def test_redis_unreachable_at_start(start_server: Any, tmp_path: Any) -> None:
    redis_port = free_port()
    node = start_server("--redis", f"redis://127.0.0.1:{redis_port}/0")
    assert node.get("/health")[0] == 200
    assert node.get("/ready")[0] == 503
    client = node.connect()
    client.publish("x", 1, id="early")
    assert client.recv_json()["code"] == 503
    redis = RedisServer(tmp_path / "late.log", port=redis_port)
    try:
        node.wait_ready(timeout=5)
        listener = node.connect().subscribe("x")
        wait_for(lambda: redis.subscribers("x") == 1)
        client.publish("x", json.loads("[1]"))
        assert listener.recv_json()["data"] == [1]
    finally:
        redis.kill()


@pytest.mark.slow
def test_a_slow_redis_never_stalls_the_websocket_side(
        start_server: Any, redis_server: RedisServer) -> None:
    node = node_on(redis_server, start_server)
    client = node.connect().subscribe("calm")
    asleep = threading.Thread(target=redis_server.command, args=("DEBUG", "SLEEP", "2"))
    asleep.start()
    wait_for(lambda: not redis_server.ping(timeout=0.1))  # it sleeps
    client.publish("calm", 1, id="waits")
    client.send_json({"type": "ping"})
    assert client.recv_json() == {"type": "pong"}  # answered while Redis sleeps
    assert asleep.is_alive()
    asleep.join()
    replies = [client.recv_json() for _ in range(2)]  # then the publish completes
    assert {r["type"] for r in replies} == {"published", "message"}
