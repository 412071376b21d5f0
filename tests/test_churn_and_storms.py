"""Connections that come and go leave nothing behind; idle sockets block nobody."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from typing import Any

import pytest
from support.processes import loadgen
from support.server import Server, token, worker_rss_kib
from support.waiting import wait_for

pytestmark = pytest.mark.slow  # thousands of connections from the load generator


def cycle(server: Server, channel: str) -> None:
    """Connect, subscribe, receive a message, disconnect."""
    client = server.connect().subscribe(channel)
    client.publish(channel, "x" * 500)
    assert client.recv_json()["type"] == "message"
    client.close()


def test_churn_leaves_no_memory_or_channels_behind(start_server: Any) -> None:
    """A short version of benchmarks/churn.py: RSS after 3,000 cycles ~ RSS after 500."""
    server = start_server("--publish-rate", "1000000")
    for n in range(500):
        cycle(server, f"churn-{n}")  # a channel per cycle: each must leave the table
    wait_for(lambda: server.metrics()["fastfan_connections"] == 0)
    warm = worker_rss_kib(server)
    for n in range(500, 3000):
        cycle(server, f"churn-{n}")
    figures = wait_for(lambda: (m := server.metrics())["fastfan_connections"] == 0 and m)
    grown = worker_rss_kib(server) - warm
    assert figures["fastfan_channels"] == 0
    assert figures["fastfan_subscriptions"] == 0
    assert figures["fastfan_connections_total"] == 3000
    assert grown < 2048, f"RSS grew {grown} KiB over 2,500 cycles"


def test_half_open_connections_and_slow_handshakes_block_no_one(server: Server) -> None:
    silent = [socket.create_connection((server.host, server.port)) for _ in range(200)]
    trickling = []
    for _ in range(50):  # a handshake that never finishes
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        trickling.append(sock)
    started = time.monotonic()
    client = server.connect()
    client.send_json({"type": "ping"})
    assert client.recv_json() == {"type": "pong"}
    assert time.monotonic() - started < 2  # served at once, not after the stragglers
    for sock in silent + trickling:  # dropped after the handshake timeout (5 s)
        sock.settimeout(10)
        assert sock.recv(100) == b""
        sock.close()
    client.send_json({"type": "ping"})
    assert client.recv_json() == {"type": "pong"}  # the real client is still there


def test_a_reconnect_storm_is_served(start_server: Any) -> None:
    """2,000 clients from 10 processes at once (benchmarks/storm.py does 10,000)."""
    server = start_server("--workers", "2")
    storm = [subprocess.Popen(
        [str(loadgen()), "--port", str(server.port), "--path", f"/?token={token()}",
         "--subs", "200", "--rate", "0", "--sync", "1", "--channel", "storm",
         "--duration", "0", "--drain", "0", "--sources", f"127.0.0.{2 + k}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for k in range(10)]
    for process in storm:
        assert process.stdout is not None
        assert json.loads(process.stdout.readline())["ready"]  # all 200 welcomed, subscribed
    assert wait_for(lambda: server.metrics()["fastfan_connections"] == 2000)
    for process in storm:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.wait(60) == 0
