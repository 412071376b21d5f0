"""A subscriber that stops reading: the policies, bounded memory, and nobody else delayed."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from support.server import Server, worker_rss_kib
from support.waiting import wait_for
from support.wire import RawClient

MESSAGES = 5000
DATA = "x" * 4000  # 5000 x 4 KB = 20 MB per subscriber: far past the kernel's buffers
MAX_BUFFER = 1 << 20
# The worker's RSS may grow by a few --max-buffer (the stalled queue, the transport's part,
# allocator slack). Without the bound it grows by ~17 MB here: 20 MB sent, minus what the
# kernel's socket buffers hold.
GROWTH_LIMIT_KIB = 4 * MAX_BUFFER // 1024
# A fast reader is one that keeps up: the publisher lets it fall at most about two windows
# behind (2 x 25 x 4 KB per channel, far under --max-buffer). Unpaced, these tests would
# measure whether Python threads on a busy machine outread the publisher, not the server.
WINDOW = 25


class Reader(threading.Thread):
    """A subscriber that reads as fast as it can, in its own thread."""

    def __init__(self, server: Server, channels: list[str], expected: int) -> None:
        super().__init__(daemon=True)
        self.client = subscribe(server, channels)
        self.expected = expected
        self.received: list[tuple[str, int]] = []
        self.start()

    def run(self) -> None:
        while len(self.received) < self.expected:
            message = self.client.recv_json()
            self.received.append((message["channel"], message["data"]["n"]))


def subscribe(server: Server, channels: list[str], **options: Any) -> RawClient:
    return server.connect(timeout=30, **options).subscribe(*channels)


def stalled(server: Server, channels: list[str]) -> RawClient:
    """Subscribes, then reads nothing; its receive window is as small as the kernel allows."""
    return subscribe(server, channels, receive_buffer=4096)


def publish(server: Server, channels: list[str], count: int,
            readers: list[Reader] | None = None) -> None:
    publisher = server.connect(timeout=30)
    for n in range(count):
        for channel in channels:
            publisher.publish(channel, {"n": n, "pad": DATA})
        if readers and n % WINDOW == 0:
            least = (n - WINDOW) * len(channels)
            wait_for(lambda least=least: all(len(r.received) >= least for r in readers),
                     30, 0.001)
    publisher.send_json({"type": "ping"})
    assert publisher.recv_json() == {"type": "pong"}  # the server has handled them all


# These clients answer no heartbeat, and a reader that only reads would find a PING among its
# messages once a busy machine stretches a test past --ping-interval (30 s): not this file's
# subject, so the heartbeat is put out of reach.
NO_HEARTBEAT = ("--ping-interval", "600", "--ping-timeout", "1200")


def start(start_server: Any, policy: str) -> Server:
    return start_server("--slow-consumer", policy, "--max-buffer", str(MAX_BUFFER),
                        "--publish-rate", "1000000", "--max-message-size", "10000", *NO_HEARTBEAT)


@pytest.mark.slow
def test_disconnect_closes_the_stalled_client_with_4008(start_server: Any) -> None:
    server = start(start_server, "disconnect")
    slow = stalled(server, ["feed"])
    fast = [Reader(server, ["feed"], MESSAGES) for _ in range(3)]
    before = worker_rss_kib(server)
    publish(server, ["feed"], MESSAGES, fast)
    for reader in fast:
        reader.join(60)
        assert [n for _, n in reader.received] == list(range(MESSAGES))
    assert slow.recv_close() == (4008, "slow consumer")
    assert worker_rss_kib(server) - before < GROWTH_LIMIT_KIB
    figures = wait_for(lambda: (m := server.metrics())["fastfan_slow_consumers_disconnected_total"]
                       == 1 and m)
    assert figures["fastfan_connections"] == 4  # the fast three and the publisher


@pytest.mark.slow
def test_drop_discards_until_the_client_drains_and_counts(start_server: Any) -> None:
    server = start(start_server, "drop")
    slow = stalled(server, ["feed"])
    fast = Reader(server, ["feed"], MESSAGES)
    before = worker_rss_kib(server)
    publish(server, ["feed"], MESSAGES, [fast])
    fast.join(60)
    assert [n for _, n in fast.received] == list(range(MESSAGES))
    grown = worker_rss_kib(server) - before
    dropped = server.metrics()['fastfan_dropped_total{reason="slow_consumer"}']
    assert dropped > 0
    # Now it reads: what it gets is in order, with the dropped ones missing.
    got = []
    while len(got) < MESSAGES - dropped:
        got.append(slow.recv_json()["data"]["n"])
    assert got == sorted(got) and got[0] == 0
    assert len(got) + dropped == MESSAGES
    assert grown < GROWTH_LIMIT_KIB
    slow.send_json({"type": "ping"})
    assert slow.recv_json() == {"type": "pong"}  # still connected, still served


@pytest.mark.slow
def test_conflate_delivers_the_newest_of_each_channel_once_drained(start_server: Any) -> None:
    server = start(start_server, "conflate")
    slow = stalled(server, ["a", "b"])
    fast = Reader(server, ["a", "b"], 2 * MESSAGES)
    publish(server, ["a", "b"], MESSAGES, [fast])
    fast.join(60)
    assert len(fast.received) == 2 * MESSAGES
    conflated = server.metrics()['fastfan_dropped_total{reason="conflated"}']
    assert conflated > 0
    last: dict[str, int] = {}
    while last != {"a": MESSAGES - 1, "b": MESSAGES - 1}:
        message = slow.recv_json()
        channel, n = message["channel"], message["data"]["n"]
        assert n > last.get(channel, -1)  # per channel, never older than what came before
        last[channel] = n
    slow.send_json({"type": "ping"})
    assert slow.recv_json() == {"type": "pong"}  # nothing after the newest of each


def test_small_and_large_messages_keep_their_order_through_a_stalled_reader(
        start_server: Any) -> None:
    """Large frames are queued by reference and small ones copied: a reader that stalls
    (partial writes, the rest left with the transport) still gets every byte in order."""
    server = start_server("--max-buffer", str(64 << 20), "--publish-rate", "1000000",
                          "--max-message-size", "100000", *NO_HEARTBEAT)
    slow = stalled(server, ["mixed"])
    sizes = [(10, 5000, 100, 40000, 4000, 4100, 70000, 1)[n % 8] for n in range(400)]
    publisher = server.connect(timeout=30)
    for n, size in enumerate(sizes):
        publisher.publish("mixed", {"n": n, "pad": chr(ord("a") + n % 26) * size})
    publisher.send_json({"type": "ping"})
    assert publisher.recv_json() == {"type": "pong"}  # all handled, most still queued
    for n, size in enumerate(sizes):
        data = slow.recv_json()["data"]
        assert (data["n"], data["pad"]) == (n, chr(ord("a") + n % 26) * size)
    slow.send_json({"type": "ping"})
    assert slow.recv_json() == {"type": "pong"}
    assert server.metrics()['fastfan_dropped_total{reason="slow_consumer"}'] == 0
