"""`subscribed` is a promise: a message published anywhere right after the reply arrives.

Each round subscribes to a fresh channel (so no worker or node already forwards it) and
publishes on another worker or node the moment `subscribed` is read. Before the reply
waited for the bus, the other side could still be without the subscription: the message
was lost in some rounds.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from support.redis import RedisServer
from support.wire import RawClient
from support.workers import one_per_worker

ROUNDS = 150


def first_lost_round(subscriber: RawClient, publisher: RawClient) -> int | None:
    """The first round whose message did not arrive within the client's timeout, if any."""
    for n in range(ROUNDS):
        channel = f"fresh.{n}"
        subscriber.send_json({"type": "subscribe", "channel": channel})
        assert subscriber.recv_json() == {"type": "subscribed", "channel": channel}
        publisher.send_json({"type": "publish", "channel": channel, "data": n})
        try:
            message = subscriber.recv_json()
        except TimeoutError:
            return n
        assert (message["channel"], message["data"]) == (channel, n)
    return None


@pytest.mark.slow
def test_across_workers(start_server: Any) -> None:
    server = start_server("--workers", "2")
    first, second = one_per_worker(server).values()
    assert first_lost_round(first, second) is None
    assert first_lost_round(second, first) is None


@pytest.mark.slow
def test_across_nodes(start_server: Any, redis_server: RedisServer) -> None:
    near = start_server("--redis", redis_server.url)
    far = start_server("--redis", redis_server.url)
    near.wait_ready()
    far.wait_ready()
    assert first_lost_round(near.connect(timeout=2), far.connect()) is None


def no_reply_within(client: RawClient, seconds: float) -> bool:
    client.sock.settimeout(seconds)
    try:
        client.recv_frame()
    except TimeoutError:
        return True
    finally:
        client.sock.settimeout(10)
    return False


@pytest.mark.slow
def test_the_reply_waits_for_the_other_worker(start_server: Any) -> None:
    """While the other worker cannot have heard of the subscription (stopped), there is
    no `subscribed`; it follows once that worker has it."""
    server = start_server("--workers", "2")
    held = one_per_worker(server)
    (here, subscriber), (there, publisher) = held.items()
    os.kill(there, signal.SIGSTOP)
    try:
        subscriber.send_json({"type": "subscribe", "channel": "held", "id": 1})
        assert no_reply_within(subscriber, 0.5)
    finally:
        os.kill(there, signal.SIGCONT)
    assert subscriber.recv_json() == {"type": "subscribed", "channel": "held", "id": 1}
    publisher.send_json({"type": "publish", "channel": "held", "data": "after"})
    assert subscriber.recv_json()["data"] == "after"
    assert here != there


@pytest.mark.slow
def test_the_reply_waits_for_redis(start_server: Any, redis_server: RedisServer) -> None:
    node = start_server("--redis", redis_server.url)
    node.wait_ready()
    subscriber = node.connect()
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        subscriber.send_json({"type": "subscribe", "channel": "held"})
        assert no_reply_within(subscriber, 0.5)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert subscriber.recv_json() == {"type": "subscribed", "channel": "held"}
    assert redis_server.subscribers("held") == 1  # Redis had it before the reply
