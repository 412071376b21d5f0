"""Plain HTTP on the WebSocket port, and the process's life: health, metrics, shutdown."""

from __future__ import annotations

import json
import signal
import socket
import time
from typing import Any

import pytest
from support.redis import RedisServer
from support.server import Server, token
from support.waiting import wait_for
from support.wire import CLOSE, PING, PONG, TEXT, free_port


def test_health_and_ready(server: Server) -> None:
    assert server.get("/health")[0] == 200
    assert server.get("/ready")[0] == 200


def test_unknown_paths_are_404(server: Server) -> None:
    assert server.get("/nope")[0] == 404
    assert server.get("/echo")[0] == 404  # only with --echo-path


def test_metrics_count_what_happened(server: Server) -> None:
    subscriber, publisher = server.connect().subscribe("m"), server.connect(path="/ws")
    for i in range(5):
        publisher.publish("m", i)
    assert [subscriber.recv_json()["data"] for _ in range(5)] == list(range(5))
    figures = server.metrics()
    assert figures["fastfan_connections"] == 2
    assert figures["fastfan_connections_total"] == 2
    assert figures["fastfan_channels"] == 1
    assert figures["fastfan_subscriptions"] == 1
    assert figures["fastfan_messages_received_total"] == 6
    assert figures["fastfan_deliveries_total"] == 5
    assert figures["fastfan_bytes_sent_total"] > 5 * 60
    _, headers, _ = server.get("/metrics")
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    subscriber.close()
    publisher.close()
    figures = wait_for(lambda: (m := server.metrics())["fastfan_connections"] == 0 and m, 5)
    assert (figures["fastfan_connections"], figures["fastfan_channels"]) == (0, 0)


@pytest.mark.parametrize("path", ["/", "/ws"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": f"Bearer {token()}"}])
def test_a_browser_opening_the_websocket_path_is_told_it_is_one(
        server: Server, path: str, headers: dict[str, str]) -> None:
    status, answer, body = server.get(path, headers)
    assert (status, answer["Upgrade"]) == (426, "websocket")
    assert b"WebSocket endpoint" in body


def head(host: str, port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A HEAD request: its status, headers and whatever came after them (nothing, we hope)."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: fastfan\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):  # the server closes after answering
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    return int(status_line.split()[1]), dict(line.split(": ", 1) for line in lines), rest


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/fastfan.js"])
def test_head_is_the_get_without_its_body(server: Server, path: str) -> None:
    status, headers, rest = head(server.host, server.port, path)
    get_status, get_headers, body = server.get(path)
    assert (status, rest) == (get_status, b"")
    assert headers["Content-Type"] == get_headers["Content-Type"]
    if path != "/metrics":  # its figures change between the two requests
        assert int(headers["Content-Length"]) == len(body)


def test_head_of_an_unknown_path_or_the_websocket_path(server: Server) -> None:
    assert head(server.host, server.port, "/nope")[::2] == (404, b"")
    assert head(server.host, server.port, "/")[::2] == (426, b"")
    assert server.get("/health")[0] == 200  # and GETs still go to picows


def test_ready_says_why_not(start_server: Any) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}"
    server = start_server("--redis", nowhere)
    status, _, body = server.get("/ready")
    assert (status, body) == (503, b"redis down\n")
    assert server.get("/health")[0] == 200


def test_ready_names_the_shards_down(start_server: Any, redis_server: RedisServer) -> None:
    nowhere = free_port()
    server = start_server("--redis", f"{redis_server.url},redis://127.0.0.1:{nowhere}")
    down = f"shard 1 down (127.0.0.1:{nowhere})\n".encode()
    wait_for(lambda: server.get("/ready")[::2] == (503, down))  # once shard 0 is reached


def test_sigterm_closes_every_client_with_1001_and_exits_0(server: Server) -> None:
    clients = [server.connect() for _ in range(5)]
    server.process.send_signal(signal.SIGTERM)
    for client in clients:
        assert client.recv_close() == (1001, "Server shutting down")
        client.send_frame(CLOSE, b"\x03\xe9")  # answer the CLOSE, as a browser would
    assert server.process.wait(10) == 0


@pytest.mark.slow
def test_sigterm_exits_within_the_grace_when_clients_do_not_answer(start_server: Any) -> None:
    server = start_server("--shutdown-grace", "1")
    silent = server.connect()
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert silent.recv_close()[0] == 1001
    assert server.process.wait(10) == 0
    assert time.monotonic() - started < 3


@pytest.mark.slow
def test_client_that_never_answers_pings_is_closed_1001(start_server: Any) -> None:
    server = start_server("--ping-interval", "0.3", "--ping-timeout", "1")
    client = server.connect()
    _, opcode, _ = client.recv_frame()
    assert opcode == PING  # the heartbeat ping, which this client ignores
    assert client.recv_close() == (1001, "heartbeat timeout")


@pytest.mark.slow
def test_client_that_answers_pings_stays(start_server: Any) -> None:
    server = start_server("--ping-interval", "0.3", "--ping-timeout", "1")
    client = server.connect()
    deadline = time.monotonic() + 2.5
    pings = 0
    while time.monotonic() < deadline:
        _, opcode, payload = client.recv_frame()
        assert opcode == PING, (opcode, payload)
        pings += 1
        client.send_frame(PONG, payload)
    assert pings >= 3
    client.send_frame(TEXT, json.dumps({"type": "ping"}).encode())
    assert client.recv_json() == {"type": "pong"}
