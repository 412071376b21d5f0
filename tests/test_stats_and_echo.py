"""The seed's per-connection figures (`stats`) and its broadcast that skips the sender."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from support.redis import RedisServer
from support.server import token
from support.waiting import wait_for
from support.wire import RawClient, frame


def raw(server: Any, user: str = "alice") -> tuple[RawClient, bytes]:
    """A connected client and the welcome's payload, as the server framed it."""
    client = RawClient(server.host, server.port, f"/?token={token(user)}")
    _, _, welcome = client.recv_frame()
    return client, welcome


def test_stats_counts_what_went_each_way(server: Any) -> None:
    before = int(time.time() * 1000)
    client, welcome = raw(server, "carol")
    subscribe = json.dumps({"type": "subscribe", "channel": "room.1"}).encode()
    client.sock.sendall(frame(0x1, subscribe))
    _, _, subscribed = client.recv_frame()
    stats_request = b'{"type":"stats","id":"s1"}'
    client.sock.sendall(frame(0x1, stats_request))
    reply = client.recv_json()
    assert reply["type"] == "stats" and reply["id"] == "s1"
    data = reply["data"]
    assert data["clientId"] == json.loads(welcome)["data"]["clientId"]
    assert data["user"] == "carol"
    assert before - 1000 <= data["connectedAt"] <= int(time.time() * 1000)
    assert data["channels"] == ["room.1"]
    # this request counted as received, its reply not yet as sent
    assert data["messagesReceived"] == 2
    assert data["bytesReceived"] == len(subscribe) + len(stats_request)
    assert data["messagesSent"] == 2
    assert data["bytesSent"] == len(welcome) + len(subscribed)


def test_stats_counts_deliveries(server: Any) -> None:
    subscriber, welcome = raw(server)
    subscriber.send_json({"type": "subscribe", "channel": "feed"})
    _, _, subscribed = subscriber.recv_frame()
    publisher, _ = raw(server)
    sizes = []
    for n in range(3):
        publisher.send_json({"type": "publish", "channel": "feed", "data": {"n": n}})
        _, _, message = subscriber.recv_frame()
        sizes.append(len(message))
    subscriber.send_json({"type": "stats"})
    data = subscriber.recv_json()["data"]
    assert data["messagesSent"] == 5
    assert data["bytesSent"] == len(welcome) + len(subscribed) + sum(sizes)


@pytest.mark.parametrize("bus", ["one worker", "two workers", "redis"])
def test_publish_without_echo_skips_only_the_publisher(start_server: Any, tmp_path: Any,
                                                       bus: str) -> None:
    if bus == "redis":
        redis = RedisServer(tmp_path / "redis.log")
        args: tuple[str, ...] = ("--redis", redis.url)
    else:
        args = ("--workers", "2") if bus == "two workers" else ()
    try:
        server = start_server(*args)
        wait_for(lambda: server.get("/ready")[0] == 200)
        publisher, _ = raw(server)
        others = [raw(server, "bob")[0] for _ in range(4)]  # on either worker
        for client in (publisher, *others):
            client.send_json({"type": "subscribe", "channel": "chat"})
            assert client.recv_json()["type"] == "subscribed"
        publisher.send_json({"type": "publish", "channel": "chat", "data": "quiet",
                             "echo": False, "id": 1})
        assert publisher.recv_json() == {"type": "published", "channel": "chat", "id": 1}
        publisher.send_json({"type": "publish", "channel": "chat", "data": "loud"})
        # the default echoes, and nothing came before it
        assert publisher.recv_json()["data"] == "loud"
        for other in others:
            assert [other.recv_json()["data"] for _ in range(2)] == ["quiet", "loud"]
    finally:
        if bus == "redis":
            redis.kill()


@pytest.mark.parametrize("echo", ['"no"', "0", "null", "[]"])
def test_echo_must_be_a_boolean(server: Any, echo: str) -> None:
    client, _ = raw(server)
    client.sock.sendall(frame(
        0x1, b'{"type":"publish","channel":"c","data":1,"echo":%s}' % echo.encode()))
    reply = client.recv_json()
    assert reply["type"] == "error" and reply["code"] == 400
    assert "echo" in reply["message"]


def test_join_and_leave_on_unwatched_channels_do_not_wear_out_echo_false(
        start_server: Any, redis_server: RedisServer) -> None:
    """Through Redis, a publisher kept from its own message is remembered until the
    message comes back; join and leave events of channels no one on the worker watches
    never come back, so they must not be remembered: 11,000 of them once filled the
    memory (10,000 entries), and from then on "echo":false echoed (issue #25, finding 13)."""
    server = start_server("--redis", redis_server.url)
    server.wait_ready()
    for batch in range(11):
        joiner, _ = raw(server, f"joiner{batch}")
        channels = [f"c{batch}-{index}" for index in range(1000)]
        joiner.send_json_burst([{"type": "subscribe", "channel": channel}
                                for channel in channels])
        for _ in channels:
            assert joiner.recv_json()["type"] == "subscribed"
    publisher, _ = raw(server)
    publisher.subscribe("chat")
    publisher.send_json({"type": "publish", "channel": "chat", "data": "quiet", "echo": False})
    publisher.send_json({"type": "publish", "channel": "chat", "data": "loud"})
    assert publisher.recv_json()["data"] == "loud"
