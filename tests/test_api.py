"""The server API (--api-port, --api-key): routes, methods, limits, `fastfan publish`."""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import termios
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from support.api import AUTH, KEY, answers, assert_error, call, request, start_api
from support.processes import process_holding
from support.redis import RedisServer
from support.server import Server, messages_of, token
from support.waiting import wait_for
from support.wire import TEXT, RawClient, free_port
from support.workers import place
from websockets.sync.client import ClientConnection, connect

AUTH_LINE = f"Authorization: apikey {KEY}\r\n".encode()


def subscriber(clients: ExitStack, server: Server, channel: str) -> ClientConnection:
    client = clients.enter_context(connect(server.url(token=token())))
    messages_of(client, 1)  # welcome
    client.send(json.dumps({"type": "subscribe", "channel": channel}))
    assert messages_of(client, 1)[0]["type"] == "subscribed"
    return client


@pytest.mark.slow
def test_calls_need_the_key_in_an_apikey_header(start_server: Any) -> None:
    server, port = start_api(start_server)
    wrong_ones: list[dict[str, str]] = [
        {}, {"Authorization": "apikey not-the-key"}, {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"apikey {KEY}x"}, {"Authorization": "apikey"},
    ]
    for headers in wrong_ones:
        status, answer = call(port, "publish", {"channel": "c", "data": 1}, headers=headers)
        assert status == 401, headers
        assert_error(answer, 401, "apikey")
    assert call(port, "publish", {"channel": "c", "data": 1}) == (200, {"result": {}})
    # The key is the API's, never the public port's.
    assert server.get("/api/publish")[0] == 404


@pytest.mark.slow
def test_unknown_methods_404(start_server: Any) -> None:
    _, port = start_api(start_server)
    status, answer = call(port, "frobnicate")
    assert status == 404
    assert_error(answer, 404, "frobnicate", "publish")
    # A channel without history (none is kept here): nothing to tell, and no error.
    assert call(port, "history", {"channel": "c"}) == (
        200, {"result": {"offset": 0, "epoch": "", "messages": []}})
    assert request("127.0.0.1", port, "GET", "/api/publish", headers=AUTH)[0] == 405
    assert request("127.0.0.1", port, "GET", "/elsewhere")[0] == 404


BAD_BODIES = [
    (b"{not json", ["malformed"]),
    (b"[1, 2]", ["object"]),
    (b'{"data": 1}', ["channel"]),
    (b'{"channel": "bad name!", "data": 1}', ["invalid channel"]),
    (b'{"channel": "", "data": 1}', ["invalid channel"]),
    (b'{"channel": 7, "data": 1}', ["channel"]),
    (b'{"channel": "ok"}', ["data"]),
]


@pytest.mark.slow
def test_bad_publish_bodies_get_400_and_publish_nothing(
        start_server: Any, clients: ExitStack) -> None:
    server, port = start_api(start_server)
    client = subscriber(clients, server, "ok")
    for body, words in BAD_BODIES:
        status, answer = call(port, "publish", raw=body)
        assert status == 400, body
        assert_error(answer, 400, *words)
    assert call(port, "publish", {"channel": "ok", "data": "after"})[0] == 200
    assert messages_of(client, 1)[0]["data"] == "after"  # nothing came before it


@pytest.mark.slow
def test_too_large_bodies_get_413_and_bad_http_400(start_server: Any) -> None:
    _, port = start_api(start_server, "--max-message-size", "1000")
    big = json.dumps({"channel": "c", "data": "x" * 100_000}).encode()
    status, answer = call(port, "publish", raw=big)
    assert status == 413
    assert_error(answer, 413, "--max-message-size")
    # Chunked, with no Content-Length to refuse it early: counted as it comes.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     + AUTH_LINE + b"\r\n")
        for _ in range(40):
            sock.sendall(b"1000\r\n" + b"x" * 0x1000 + b"\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        answer_bytes = sock.recv(65536)
        assert answer_bytes.startswith(b"HTTP/1.1 400 ")
        assert b"Traceback" not in answer_bytes
        assert sock.recv(1) == b""  # and the connection closes
    status, _, _ = request("127.0.0.1", port, "GET", "/health", headers={"X-Big": "y" * 20000})
    assert status == 431


@pytest.mark.slow
def test_publish_reaches_subscribers_from_api_with_data_byte_for_byte(
        start_server: Any, clients: ExitStack) -> None:
    server, port = start_api(start_server)
    client = subscriber(clients, server, "news.eu")
    other = subscriber(clients, server, "sports")
    data = b'{ "title" :"caf\xc3\xa9",\t"n": 1.50e3, "list": [ 1,2 ,null ] }'
    body = b'{"channel": "news.eu", "data": ' + data + b"}"
    assert call(port, "publish", raw=body) == (200, {"result": {}})
    text = client.recv(timeout=5)
    assert isinstance(text, str)
    assert text.encode().startswith(b'{"type":"message","channel":"news.eu","data":' + data
                                    + b',"from":"api","timestamp":')
    message = json.loads(text)
    assert abs(message["timestamp"] - time.time() * 1000) < 5000
    with pytest.raises(TimeoutError):
        other.recv(timeout=0.3)


@pytest.mark.slow
def test_broadcast_sends_one_message_to_each_channel(start_server: Any, clients: ExitStack) -> None:
    server, port = start_api(start_server)
    subscribers = {channel: subscriber(clients, server, channel) for channel in "abc"}
    status, answer = call(port, "broadcast", {"channels": ["a", "b"], "data": {"x": 1}})
    assert (status, answer) == (200, {"result": {}})
    for channel in ("a", "b"):
        message = messages_of(subscribers[channel], 1)[0]
        assert (message["channel"], message["data"], message["from"]) == (channel, {"x": 1}, "api")
    with pytest.raises(TimeoutError):
        subscribers["c"].recv(timeout=0.3)
    for body in ({"channels": [], "data": 1}, {"channels": ["a", "no way"], "data": 1},
                 {"channels": "a", "data": 1}):
        assert call(port, "broadcast", body)[0] == 400
    with pytest.raises(TimeoutError):
        subscribers["a"].recv(timeout=0.3)  # a list with a bad name publishes to none of it


@pytest.mark.slow
def test_publish_reaches_subscribers_on_every_worker(start_server: Any) -> None:
    server, port = start_api(start_server, "--workers", "2")
    workers = server.workers()
    assert len(workers) == 2
    # (`subscribed` promises that a publish on any worker from then on reaches them)
    placed = place(server, 2, channels=("everywhere",))
    # Each connection lands on whichever worker the kernel picks: call until both answered.
    answered_by: set[int | None] = set()
    sent = 0
    while sent < 10 or len(answered_by) < 2:
        assert sent < 100, answered_by
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        assert call(port, "publish", {"channel": "everywhere", "data": sent}, conn=conn)[0] == 200
        assert conn.sock is not None
        answered_by.add(process_holding(conn.sock.getsockname()[1], workers))
        conn.close()
        sent += 1
    assert answered_by == set(workers)
    # Separate connections are separate publishers: their messages may cross on the way.
    for clients in placed.values():
        for client in clients:
            assert sorted(api_data(client, sent)) == list(range(sent))
    # One connection is one publisher: its messages arrive in the order sent, everywhere.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for i in range(50):
        assert call(port, "publish", {"channel": "everywhere", "data": i}, conn=conn)[0] == 200
    conn.close()
    for clients in placed.values():
        for client in clients:
            assert api_data(client, 50) == list(range(50))


def api_data(client: RawClient, count: int) -> list[Any]:
    """The `data` of the next `count` messages, each a text frame from the API."""
    found = []
    for _ in range(count):
        _, opcode, payload = client.recv_frame()
        message = json.loads(payload)
        assert (opcode, message["from"]) == (TEXT, "api")
        found.append(message["data"])
    return found


@pytest.mark.slow
def test_publish_through_redis_and_503_while_it_is_down(
        start_server: Any, redis_server: RedisServer, clients: ExitStack) -> None:
    server, port = start_api(start_server, "--redis", redis_server.url)
    wait_for(lambda: server.get("/ready")[0] == 200)
    client = subscriber(clients, server, "via.redis")
    before = {"channel": "via.redis", "data": "before"}
    assert call(port, "publish", before) == (200, {"result": {}})  # Redis has taken it
    assert messages_of(client, 1)[0]["data"] == "before"
    redis_server.kill()
    status, answer = wait_for(lambda: (r := call(port, "publish", {"channel": "via.redis",
                                                                    "data": "during"}))[0] != 200
                              and r, timeout=5)
    assert status == 503
    assert_error(answer, 503, "bus")
    assert "Traceback" not in server.log()


def test_one_connection_serves_many_requests(start_server: Any, clients: ExitStack) -> None:
    server, port = start_api(start_server)
    client = subscriber(clients, server, "kept")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    assert request("127.0.0.1", port, "GET", "/health", conn=conn)[0] == 200
    sock = conn.sock
    assert sock is not None
    for i in range(5):
        assert call(port, "publish", {"channel": "kept", "data": i}, conn=conn)[0] == 200
        assert call(port, "nothing-here", conn=conn)[0] == 404  # errors keep it open too
    status, headers, _ = request("127.0.0.1", port, "GET", "/metrics", conn=conn)
    assert (status, headers["Connection"]) == (200, "keep-alive")
    assert conn.sock is sock  # http.client reopens silently: the same socket proves it
    conn.close()
    assert [m["data"] for m in messages_of(client, 5)] == list(range(5))


@pytest.mark.slow
def test_pipelined_requests_are_answered_in_order(start_server: Any) -> None:
    _, port = start_api(start_server)
    body = b'{"channel":"p","data":1}'
    one = (b"POST /api/publish HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE
           + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(one + health + one + b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while received.count(b"HTTP/1.1 ") < 4:
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
    statuses = [int(part[:3]) for part in received.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [200, 200, 200, 405]
    # Far more than are answered at once, the answers far more than a socket buffer holds:
    # the server stops reading while we do not read, and carries on when we do.
    many, status_line = 2000, b"HTTP/1.1 200 OK\r\n"
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * many)
        # until the answers fill our small window: the server's writes wait on us
        wait_for(lambda: unread_bytes(sock) >= 2048)
        answered, tail = 0, b""
        while answered < many:
            chunk = tail + sock.recv(1 << 20)
            assert len(chunk) > len(tail), answered
            answered += chunk.count(status_line)
            tail = chunk[-len(status_line) + 1:]
    assert answered == many


@pytest.mark.slow
def test_metrics_on_the_api_port_and_off_the_public_one(
        start_server: Any, clients: ExitStack) -> None:
    server, port = start_api(start_server)
    status, headers, body = request("127.0.0.1", port, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"\nfastfan_connections 0\n" in body
    assert server.get("/metrics")[0] == 200  # kept on the public port by default
    subscriber(clients, server, "seen")
    status, _, body = request("127.0.0.1", port, "GET", "/metrics")
    assert b"\nfastfan_connections 1\n" in body and b"\nfastfan_subscriptions 1\n" in body

    hidden, hidden_port = start_api(start_server, "--metrics-public", "off")
    assert hidden.get("/metrics")[0] == 404
    assert hidden.get("/health")[0] == 200
    assert request("127.0.0.1", hidden_port, "GET", "/metrics")[0] == 200
    env_hidden, _ = start_api(start_server, env={"FASTFAN_METRICS_PUBLIC": "off"})
    assert env_hidden.get("/metrics")[0] == 404


def test_channels_and_info(start_server: Any, clients: ExitStack) -> None:
    server, port = start_api(start_server)
    for channel in ("room.1", "room.1", "room.2", "lobby"):
        subscriber(clients, server, channel)
    status, answer = call(port, "channels")
    assert (status, answer) == (200, {"result": {"channels": {
        "room.1": {"subscribers": 2}, "room.2": {"subscribers": 1},
        "lobby": {"subscribers": 1}}}})
    answer = call(port, "channels", {"pattern": "room.*"})[1]
    assert answer == {"result": {"channels": {"room.1": {"subscribers": 2},
                                              "room.2": {"subscribers": 1}}}}
    status, answer = call(port, "info", raw=b"")
    assert status == 200
    (node,) = answer["result"]["nodes"]
    assert node["name"] == f"{socket.gethostname()}:{server.port}"
    assert (node["workers"], node["connections"], node["subscriptions"]) == (1, 4, 4)
    assert 0 <= node["uptime"] < 60


def unread_bytes(sock: socket.socket) -> int:
    """What the kernel holds for `sock` that it has not read yet (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]  # type: ignore[no-any-return]


def fastfan(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FASTFAN_")}
    return subprocess.run([sys.executable, "-m", "fastfan", *args], capture_output=True,
                          text=True, timeout=20, env={**clean, **(env or {})})


@pytest.mark.parametrize("args, words", [
    (["--api-port", "9999"], ["--api-port", "--api-key"]),
    (["--api-key", "k"], ["--api-port", "--api-key"]),
    (["--api-port", "9999", "--api-key", ""], ["empty"]),
    (["--api-port", "9999", "--api-key-file", "/nonexistent/key"], ["--api-key-file"]),
    (["--api-port", "9999", "--api-key", "k", "--api-key-file", "/etc/hostname"], ["not both"]),
    (["--api-port", "0", "--api-key", "k"], ["--api-port"]),
    (["--metrics-public", "maybe"], ["--metrics-public", "maybe"]),
])
def test_api_options_come_together_or_exit_2(args: list[str], words: list[str]) -> None:
    result = fastfan("run", "--insecure", "--port", str(free_port()), *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usage:")
    reason = result.stderr.strip().splitlines()[-1]  # after the usage, one line says why
    assert reason.startswith(("fastfan: error: ", "fastfan run: error: "))
    assert result.stderr.count("error:") == 1
    for word in words:
        assert word in reason


@pytest.mark.slow
def test_the_key_from_a_file_or_the_environment(start_server: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    api_port = free_port()
    start_server("--api-port", str(api_port), "--api-key-file", str(key_file))
    wait_for(lambda: answers("127.0.0.1", api_port))
    assert call(api_port, "info")[0] == 200
    assert call(api_port, "info", headers={"Authorization": "apikey " + str(key_file)})[0] == 401
    env_port = free_port()
    start_server(env={"FASTFAN_API_PORT": str(env_port), "FASTFAN_API_KEY": KEY})
    wait_for(lambda: answers("127.0.0.1", env_port))
    assert call(env_port, "info")[0] == 200


@pytest.mark.slow
def test_fastfan_publish_from_a_shell(start_server: Any, clients: ExitStack,
                                      tmp_path: Path) -> None:
    server, port = start_api(start_server)
    client = subscriber(clients, server, "shell")
    api = f"http://127.0.0.1:{port}"
    result = fastfan("publish", "--api", api, "--api-key", KEY, "shell", '{"text": "hi"}')
    assert (result.returncode, result.stdout, result.stderr) == (0, "{}\n", "")
    message = messages_of(client, 1)[0]
    assert (message["data"], message["from"]) == ({"text": "hi"}, "api")
    result = fastfan("publish", "--api", api, "shell", "[1]", env={"FASTFAN_API_KEY": KEY})
    assert result.returncode == 0
    assert messages_of(client, 1)[0]["data"] == [1]
    key_file = tmp_path / "api.key"
    key_file.write_text(KEY + "\n")  # the file `run --api-key-file` reads
    result = fastfan("publish", "--api", api, "--api-key-file", str(key_file), "shell", "2")
    assert result.returncode == 0
    assert messages_of(client, 1)[0]["data"] == 2

    wrong = fastfan("publish", "--api", api, "--api-key", "nope", "shell", "1")
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("fastfan publish: 401 ") and wrong.stderr.count("\n") == 1
    bad_channel = fastfan("publish", "--api", api, "--api-key", KEY, "no way", "1")
    assert bad_channel.returncode == 1 and "invalid channel" in bad_channel.stderr
    nobody = fastfan("publish", "--api", f"http://127.0.0.1:{free_port()}", "--api-key", KEY,
                     "shell", "1")
    assert nobody.returncode == 1 and nobody.stderr.count("\n") == 1
    assert "Traceback" not in nobody.stderr
    not_json = fastfan("publish", "--api", api, "--api-key", KEY, "shell", "{oops")
    assert not_json.returncode == 2 and "JSON" in not_json.stderr
    with pytest.raises(TimeoutError):
        client.recv(timeout=0.3)  # the failed ones published nothing
