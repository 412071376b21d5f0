"""What a stalled Redis or a careless backend can cost: bounded, and nothing to subscribers."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from typing import Any

import pytest
from support.messages import publish
from support.processes import children, peak_rss_kib
from support.redis import RedisServer
from support.waiting import wait_for
from support.wire import TEXT, frame

PUBLISHES = 5000
LARGE = "x" * 60_000


def heads_of_frames(sock: socket.socket, count: int) -> list[bytes]:
    """The first 64 bytes of each of the next `count` frames the server sends (unmasked,
    each at most 64 KiB: a 2-byte length at most)."""
    heads: list[bytes] = []
    buffer = bytearray()
    while len(heads) < count:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        buffer += chunk
        at = 0
        while len(buffer) - at >= 4:
            size, header = buffer[at + 1] & 0x7F, 2
            if size == 126:
                size, header = int.from_bytes(buffer[at + 2:at + 4], "big"), 4
            if len(buffer) - at < header + size:
                break
            heads.append(bytes(buffer[at + header:at + header + min(size, 64)]))
            at += header + size
        del buffer[:at]
    return heads


@pytest.mark.slow
@pytest.mark.parametrize(("data", "request_id", "publishes"),
                         [(LARGE, "big", PUBLISHES), ("x", LARGE, 600)],
                         ids=["large data", "large ids"])
def test_a_stalled_redis_costs_bounded_memory_answers_503_and_recovers(
        start_server: Any, redis_server: RedisServer, data: str, request_id: str,
        publishes: int) -> None:
    """The ids count too: with 50 KB ids (each kept until Redis answers), the bound once
    counted 761 KiB while the worker grew 143 MiB (issue #25, finding 12). 600 of them fill
    the queue (the 503 replies echo the ids: within --max-buffer, as a reader takes them)."""
    node = start_server("--redis", redis_server.url, "--publish-rate", "100000",
                        "--max-buffer", str(64 << 20))
    wait_for(lambda: node.get("/ready")[0] == 200)
    (worker,) = children(node.process.pid)
    before = peak_rss_kib(worker)
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        publisher = node.connect()
        replies: list[bytes] = []
        # The replies echo the ids (300 MB with the large ones): read as fast as they come,
        # each kept only as far as its code, or the server rightly cuts a slow consumer.
        reader = threading.Thread(target=lambda: replies.extend(
            heads_of_frames(publisher.sock, publishes)))
        publisher.sock.settimeout(30)
        reader.start()
        big = frame(TEXT, json.dumps(
            {"type": "publish", "channel": "big", "data": data, "id": request_id}).encode())
        for _ in range(publishes):  # one frame sent again and again: Python masks slowly
            publisher.sock.sendall(big)
        assert node.get("/ready")[0] == 503  # the queue is full, then Redis is stalled
        reader.join(30)
        assert len(replies) == publishes
        assert {reply[:27] for reply in replies} == {b'{"type":"error","code":503,'}
        grown = peak_rss_kib(worker) - before
        assert grown < 64 << 10, f"the worker grew by {grown >> 10} MiB"  # 300 or 36 MB sent
        assert node.get("/ready")[0] == 503 and node.get("/health")[0] == 200
        assert wait_for(lambda: node.metrics()["fastfan_redis_up"] == 0)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    wait_for(lambda: node.get("/ready")[0] == 200, timeout=15)
    listener = node.connect().subscribe("after")
    wait_for(lambda: redis_server.subscribers("after") == 1)
    assert publish(publisher, "after", "back", "b")["type"] == "published"
    assert listener.recv_json()["data"] == "back"
    assert "Traceback" not in node.log()


@pytest.mark.slow
def test_a_backend_payload_with_invalid_utf8_is_dropped_and_counted(
        start_server: Any, redis_server: RedisServer) -> None:
    node = start_server("--redis", redis_server.url)
    wait_for(lambda: node.get("/ready")[0] == 200)
    client = node.connect().subscribe("news")
    wait_for(lambda: redis_server.subscribers("news") == 1)
    # A JSON object, but "\xc3(" is no UTF-8: a browser would fail the connection with 1007.
    bad = b'{"type":"message","channel":"news","data":"caf\xc3(","from":"backend"}'
    redis_server.command("PUBLISH", "fastfan:news", bad)
    redis_server.command("PUBLISH", "fastfan:news", b'{"type":"message","data":"good"}')
    _, _, payload = client.recv_frame()
    assert payload == b'{"type":"message","data":"good"}'
    invalid = 'fastfan_dropped_total{reason="invalid_payload"}'
    assert wait_for(lambda: node.metrics()[invalid] == 1)
