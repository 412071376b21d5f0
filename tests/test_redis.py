"""Nodes sharing channels through a real redis-server, which the tests kill and restart."""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

from conftest import RedisServer, Server, free_port, token, wait_for
from wire import RawClient


def connect(server: Server) -> RawClient:
    client = RawClient(server.host, server.port, f"/?token={token()}")
    assert client.recv_json()["type"] == "welcome"
    return client


def subscriber(server: Server, channel: str) -> RawClient:
    client = connect(server)
    client.send_json({"type": "subscribe", "channel": channel})
    assert client.recv_json()["type"] == "subscribed"
    return client


def numsub(redis: RedisServer, channel: str) -> int:
    reply = redis.command("PUBSUB", "NUMSUB", f"fastfan:{channel}")
    return int(reply.rsplit(b":", 1)[1].strip())


def publish(client: RawClient, channel: str, data: Any, request_id: Any) -> dict[str, Any]:
    client.send_json({"type": "publish", "channel": channel, "data": data, "id": request_id})
    return dict(client.recv_json())


def test_two_nodes_deliver_to_each_others_subscribers_in_order(
        start_server: Any, redis_server: RedisServer) -> None:
    first = start_server("--redis", redis_server.url)
    second = start_server("--redis", redis_server.url, "--workers", "2")
    wait_for(lambda: first.get("/ready")[0] == 200 and second.get("/ready")[0] == 200)
    near, far = subscriber(first, "shared"), subscriber(second, "shared")
    wait_for(lambda: numsub(redis_server, "shared") == 2)
    for node in (first, second):
        publisher = connect(node)
        for i in range(500):
            publisher.send_json({"type": "publish", "channel": "shared", "data": i})
        for client in (near, far):
            assert [client.recv_json()["data"] for _ in range(500)] == list(range(500))
        publisher.close()


def test_one_redis_subscription_per_channel_dropped_with_the_last(
        start_server: Any, redis_server: RedisServer) -> None:
    node = start_server("--redis", redis_server.url)
    wait_for(lambda: node.get("/ready")[0] == 200)
    a, b = subscriber(node, "room"), subscriber(node, "room")
    wait_for(lambda: numsub(redis_server, "room") == 1)
    for client in (a, b):
        client.send_json({"type": "unsubscribe", "channel": "room"})
        assert client.recv_json()["type"] == "unsubscribed"
    wait_for(lambda: numsub(redis_server, "room") == 0)
    # A burst of subscribes goes out as one SUBSCRIBE command.
    before = _subscribe_calls(redis_server)
    burst = connect(node)
    burst.send_json_burst([{"type": "subscribe", "channel": f"burst{n}"} for n in range(100)])
    for _ in range(100):
        burst.recv_json()
    wait_for(lambda: numsub(redis_server, "burst99") == 1)
    assert _subscribe_calls(redis_server) - before <= 2  # one per loop turn that read some


def _subscribe_calls(redis: RedisServer) -> int:
    stats = redis.command("INFO", "commandstats").decode()
    found = re.search(r"cmdstat_subscribe:calls=(\d+)", stats)
    return int(found.group(1)) if found else 0


def test_a_backend_publishes_through_redis(start_server: Any, redis_server: RedisServer) -> None:
    node = start_server("--redis", redis_server.url)
    wait_for(lambda: node.get("/ready")[0] == 200)
    client = subscriber(node, "news")
    wait_for(lambda: numsub(redis_server, "news") == 1)
    message = '{"type":"message","channel":"news","data":{"headline":"hi"},"from":"backend",' \
              '"timestamp":1700000000000}'
    assert redis_server.command("PUBLISH", "fastfan:news", message) == b":1\r\n"
    _, _, payload = client.recv_frame()
    assert payload.decode() == message


def test_payloads_that_are_not_json_objects_are_dropped_and_counted(
        start_server: Any, redis_server: RedisServer) -> None:
    node = start_server("--redis", redis_server.url)
    wait_for(lambda: node.get("/ready")[0] == 200)
    client = subscriber(node, "news")
    wait_for(lambda: numsub(redis_server, "news") == 1)
    for bad in (b"not json", b"[1,2]", b'"text"', b"{\"a\":", b"\xff\xfe"):
        redis_server.command("PUBLISH", "fastfan:news", bad)
    redis_server.command("PUBLISH", "fastfan:news", b'{"type":"message","data":"good"}')
    assert client.recv_json()["data"] == "good"
    invalid = 'fastfan_dropped_total{reason="invalid_payload"}'
    figures = wait_for(lambda: (m := node.metrics())[invalid] == 5 and m)
    assert figures["fastfan_redis_up"] == 1


def test_redis_restart_refuses_meanwhile_then_resumes(
        start_server: Any, redis_server: RedisServer) -> None:
    first = start_server("--redis", redis_server.url)
    second = start_server("--redis", redis_server.url)
    wait_for(lambda: first.get("/ready")[0] == 200 and second.get("/ready")[0] == 200)
    near, far = subscriber(first, "live"), subscriber(second, "live")
    wait_for(lambda: numsub(redis_server, "live") == 2)
    publisher = connect(first)
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
    wait_for(lambda: numsub(redis_server, "live") == 2, timeout=3)
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


def test_redis_unreachable_at_start(start_server: Any, tmp_path: Any) -> None:
    redis_port = free_port()
    node = start_server("--redis", f"redis://127.0.0.1:{redis_port}/0")
    assert node.get("/health")[0] == 200
    assert node.get("/ready")[0] == 503
    client = connect(node)
    client.send_json({"type": "publish", "channel": "x", "data": 1, "id": "early"})
    assert client.recv_json()["code"] == 503
    redis = RedisServer.__new__(RedisServer)
    redis.port, redis.log_path, redis.process = redis_port, tmp_path / "late.log", None
    redis.start()
    try:
        wait_for(lambda: node.get("/ready")[0] == 200, timeout=5)
        listener = subscriber(node, "x")
        wait_for(lambda: numsub(redis, "x") == 1)
        client.send_json({"type": "publish", "channel": "x", "data": json.loads("[1]")})
        assert listener.recv_json()["data"] == [1]
    finally:
        redis.kill()


def test_a_slow_redis_never_stalls_the_websocket_side(
        start_server: Any, redis_server: RedisServer) -> None:
    node = start_server("--redis", redis_server.url)
    wait_for(lambda: node.get("/ready")[0] == 200)
    client = subscriber(node, "calm")
    asleep = threading.Thread(target=redis_server.command, args=("DEBUG", "SLEEP", "2"))
    asleep.start()
    time.sleep(0.2)
    client.send_json({"type": "publish", "channel": "calm", "data": 1, "id": "waits"})
    client.send_json({"type": "ping"})
    assert client.recv_json() == {"type": "pong"}  # answered while Redis sleeps
    assert asleep.is_alive()
    asleep.join()
    replies = [client.recv_json() for _ in range(2)]  # then the publish completes
    assert {r["type"] for r in replies} == {"published", "message"}
