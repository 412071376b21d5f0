"""The end-of-turn flush, written in slices: with many connections a pass over them takes
longer than one slice, and messages published meanwhile join the connections not written
yet. Whatever the slicing, each subscriber receives every message once, in order, and the
latency histogram counts each fan-out once, when its last subscriber is written."""

from __future__ import annotations

import time

import pytest
from support.server import Server
from support.waiting import wait_for

SUBSCRIBERS = 1200  # a pass over them takes several 0.5 ms slices
MESSAGES = 40


@pytest.mark.slow
def test_messages_published_during_a_pass_reach_everyone_once_in_order(server: Server) -> None:
    subscribers = [server.connect(source="127.0.0.2").subscribe("wide")
                   for _ in range(SUBSCRIBERS)]
    publisher = server.connect()
    for number in range(MESSAGES):
        publisher.publish("wide", number)
        time.sleep(0.001)  # each arrives while the pass for the ones before is under way
    for subscriber in subscribers:
        received = [subscriber.recv_json() for _ in range(MESSAGES)]
        assert [message["data"] for message in received] == list(range(MESSAGES))
        assert {message["channel"] for message in received} == {"wide"}
    wait_for(lambda: server.metrics()["fastfan_publish_latency_seconds_count"] == MESSAGES)
    metrics = server.metrics()
    assert metrics["fastfan_deliveries_total"] == SUBSCRIBERS * MESSAGES
    # Each fan-out is timed to its last write: none is still waiting, none counted twice.
    time.sleep(0.5)
    assert server.metrics()["fastfan_publish_latency_seconds_count"] == MESSAGES
    for subscriber in subscribers:
        subscriber.close()
