"""Bounds that hold under abuse, and a large message that is not mistaken for a backlog."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.server import token, worker_rss_kib
from support.waiting import wait_for
from support.wire import CONTINUATION, TEXT, HandshakeRefusedError, RawClient
from websockets.sync.client import connect

from fastfan._core import utf8_is_valid


def raw(server: Any, **kwargs: Any) -> RawClient:
    client = RawClient(server.host, server.port, f"/?token={token()}", timeout=30, **kwargs)
    assert client.recv_json()["type"] == "welcome"
    return client


@pytest.mark.slow
def test_a_message_larger_than_max_buffer_reaches_a_subscriber_that_keeps_up(
        start_server: Any) -> None:
    """--max-message-size 16 MiB over the default 1 MiB --max-buffer: each 3 MB message is
    one message in flight, not a backlog; the subscriber reads them all and stays."""
    server = start_server("--max-message-size", str(16 << 20))
    data = "x" * (3 << 20)
    with connect(server.url(token=token()), max_size=None) as subscriber, \
            connect(server.url(token=token()), max_size=None) as publisher:
        subscriber.recv(timeout=5)
        publisher.recv(timeout=5)
        subscriber.send(json.dumps({"type": "subscribe", "channel": "big"}))
        assert json.loads(subscriber.recv(timeout=5))["type"] == "subscribed"
        for n in range(5):
            publisher.send(json.dumps({"type": "publish", "channel": "big",
                                       "data": {"n": n, "pad": data}}))
            message = json.loads(subscriber.recv(timeout=30))
            assert message["type"] == "message" and message["data"]["n"] == n
            assert len(message["data"]["pad"]) == len(data)
    assert server.metrics()["fastfan_slow_consumers_disconnected_total"] == 0


@pytest.mark.slow
def test_conflate_keeps_no_more_than_max_buffer_per_stalled_client(start_server: Any) -> None:
    """A stalled client on 200 channels of 60 KB messages: what `conflate` keeps for it
    counts against --max-buffer, the oldest kept ones dropped and counted."""
    max_buffer = 1 << 20
    server = start_server("--slow-consumer", "conflate", "--max-buffer", str(max_buffer),
                          "--publish-rate", "1000000", "--max-message-size", "100000")
    channels = [f"c{n}" for n in range(200)]
    stalled = []
    for _ in range(4):
        client = raw(server, receive_buffer=4096)
        client.send_json_burst([{"type": "subscribe", "channel": c} for c in channels])
        for _ in channels:
            assert client.recv_json()["type"] == "subscribed"
        stalled.append(client)
    publisher = raw(server)
    before = worker_rss_kib(server)
    pad = "p" * 60_000
    for round_ in range(3):
        for channel in channels:
            publisher.send_json({"type": "publish", "channel": channel,
                                 "data": {"round": round_, "pad": pad}})
        publisher.send_json({"type": "ping"})
        assert publisher.recv_json() == {"type": "pong"}
    growth = worker_rss_kib(server) - before
    # Unbounded, each client kept 200 x 60 KB = 12 MB (48 MB for the four); bounded, each
    # holds its --max-buffer of queue plus at most --max-buffer kept.
    assert growth < 4 * 4 * max_buffer // 1024, growth
    figures = server.metrics()
    assert figures['fastfan_dropped_total{reason="conflated"}'] > 4 * 100


@pytest.mark.slow
def test_an_unfinished_fragmented_message_is_given_up(server: Any) -> None:
    client = raw(server)
    client.send_frame(TEXT, b'{"type":"ping"', fin=False)
    started = time.monotonic()
    # Pings keep the connection alive, but not the unfinished message.
    while True:
        client.send_frame(0x9, b"alive")
        _, opcode, payload = client.recv_frame()
        if opcode == 0x8:
            break
        assert time.monotonic() - started < 20
        time.sleep(0.5)
    assert payload[:2] == (1008).to_bytes(2, "big")
    assert payload[2:] == b"message not completed in time"
    assert time.monotonic() - started >= 9


def test_a_finished_fragmented_message_is_handled(server: Any) -> None:
    client = raw(server)
    client.send_frame(TEXT, b'{"type":', fin=False)
    client.send_frame(CONTINUATION, b'"ping"}')
    assert client.recv_json() == {"type": "pong"}


@pytest.mark.slow
def test_subscription_names_are_bounded_per_connection(start_server: Any) -> None:
    server = start_server("--max-subscription-bytes", "1000")
    client = raw(server)
    for n in range(3):
        client.send_json({"type": "subscribe", "channel": f"{n}" * 255})
        assert client.recv_json()["type"] == "subscribed"
    client.send_json({"type": "subscribe", "channel": "3" * 255, "id": 7})
    reply = client.recv_json()
    assert reply["code"] == 429 and reply["id"] == 7
    assert "1000 bytes" in reply["message"]
    client.send_json({"type": "unsubscribe", "channel": "0" * 255})
    assert client.recv_json()["type"] == "unsubscribed"
    client.send_json({"type": "subscribe", "channel": "3" * 255})
    assert client.recv_json()["type"] == "subscribed"  # the names freed make room again


@pytest.mark.slow
def test_connections_per_user_are_bounded(start_server: Any) -> None:
    server = start_server("--max-connections-per-user", "2")
    first, second = raw(server), raw(server)
    with pytest.raises(HandshakeRefusedError) as refused:
        raw(server)
    assert refused.value.status == 429
    assert b"--max-connections-per-user" in refused.value.body
    bob = RawClient(server.host, server.port, f"/?token={token('bob')}")
    assert bob.recv_json()["type"] == "welcome"  # another user is not affected
    first.close()
    wait_for(lambda: server.metrics()["fastfan_connections"] == 2)
    raw(server)  # welcomed: room again once one closed
    assert server.metrics()["fastfan_connections_refused_total"] == 1
    second.close()


def decodes(text: bytes) -> bool:
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("text", [b"", b"plain", "h\u00e9llo \u2603 \U0001f600".encode(),
                                  b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                  b"ok\xc0\xaf", b"\xe2\x82"])
def test_utf8_validator_agrees_with_python(text: bytes) -> None:
    assert utf8_is_valid(text) is decodes(text)


@given(st.binary(max_size=64)
       | st.text(max_size=32).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_utf8_validator_agrees_with_python_on_any_bytes(text: bytes) -> None:
    assert utf8_is_valid(text) is decodes(text)


def test_unsubscribing_in_any_order_keeps_every_other_subscriber(server: Any) -> None:
    """A channel's subscribers are an array; leaving moves the last one into the hole.
    Whatever the order of leaving, exactly the ones still subscribed receive."""
    clients = [raw(server) for _ in range(7)]
    for client in clients:
        client.subscribe("slots")
    publisher = raw(server)
    staying = list(range(7))
    for leaving in (0, 6, 3, 1):  # the first, the last, the middle, the new first
        clients[leaving].send_json({"type": "unsubscribe", "channel": "slots"})
        assert clients[leaving].recv_json()["type"] == "unsubscribed"
        staying.remove(leaving)
        publisher.publish("slots", leaving, id=leaving)
        assert publisher.recv_json()["type"] == "published"
        for n in staying:
            assert clients[n].recv_json()["data"] == leaving
    for n in (0, 6, 3, 1):
        clients[n].send_json({"type": "ping"})
        assert clients[n].recv_json() == {"type": "pong"}  # nothing was queued for them
    assert server.metrics()["fastfan_subscriptions"] == 3
