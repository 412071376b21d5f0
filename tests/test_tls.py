"""--tls-cert and --tls-key: the port speaks TLS only (wss, https), with a CA made here; every
write goes through the transport, compressed and shared frames included; a plain client
fails cleanly; Autobahn's cases pass through TLS (the compression cases by test_autobahn's
sample)."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from support.autobahn import COMPRESSION_SAMPLE, failures, run_cases
from support.server import messages_of, token
from support.tls import TlsServer
from support.waiting import wait_for
from websockets.sync.client import connect as websocket_connect


def test_wss_and_https_carry_small_large_and_compressed_frames(start_tls: Any) -> None:
    server = start_tls()
    status, _, body = server.get("/health")
    assert (status, body) == (200, b"ok\n")
    texts = ["small", "x" * 1000, "".join(f"{i:05d}" for i in range(4000))]  # copied,
    # compressed, and a compressed frame of more than 4 KiB (queued by reference)
    received = {}
    for compression in ("deflate", None):
        with websocket_connect(server.url(token=token(f"u{compression}")), ssl=server.context,
                               compression=compression) as ws:
            assert messages_of(ws)[0]["type"] == "welcome"
            ws.send(json.dumps({"type": "subscribe", "channel": "news"}))
            assert messages_of(ws)[0]["type"] == "subscribed"
            for text in texts:
                ws.send(json.dumps({"type": "publish", "channel": "news", "data": text}))
            received[compression] = [m["data"] for m in messages_of(ws, 3)]
            assert bool(ws.protocol.extensions) == (compression is not None)
    assert received == {"deflate": texts, None: texts}


@pytest.mark.slow
def test_a_stream_larger_than_the_socket_buffers_arrives_whole_and_in_order(
        start_tls: Any) -> None:
    server = start_tls("--max-buffer", str(64 << 20))
    count, text = 3000, "z" * 3000
    with websocket_connect(server.url(token=token("reader")), ssl=server.context,
                           compression=None, max_size=None) as reader, \
            websocket_connect(server.url(token=token("writer")), ssl=server.context) as writer:
        assert messages_of(reader)[0]["type"] == messages_of(writer)[0]["type"] == "welcome"
        reader.send(json.dumps({"type": "subscribe", "channel": "bulk"}))
        assert messages_of(reader)[0]["type"] == "subscribed"
        for i in range(count):  # within the publish rate's burst of 2000 ... and a bit more
            writer.send(json.dumps({"type": "publish", "channel": "bulk",
                                    "data": {"i": i, "text": text}}))
        got = [m["data"]["i"] for m in messages_of(reader, 2000, timeout=30)]
    assert got == list(range(2000))


@pytest.mark.slow
def test_a_slow_consumer_over_tls_is_disconnected_past_max_buffer(start_tls: Any) -> None:
    server = start_tls("--max-buffer", "200000")
    with websocket_connect(server.url(token=token("slow")), ssl=server.context,
                           compression=None, max_queue=1) as slow, \
            websocket_connect(server.url(token=token("fast")), ssl=server.context) as fast:
        messages_of(slow), messages_of(fast)
        slow.send(json.dumps({"type": "subscribe", "channel": "flood"}))
        assert messages_of(slow)[0]["type"] == "subscribed"
        slow.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for _ in range(1500):
            fast.send(json.dumps({"type": "publish", "channel": "flood", "data": "w" * 4000}))
        fast.send(json.dumps({"type": "ping", "id": 1}))
        assert messages_of(fast)[-1]["type"] == "pong"
        # The flood may reach the server in one read and go to the transport in one write
        # (on a busy machine it does): the bytes the client leaves unread then wait there,
        # and the first message after them, which it cannot take, is the one that cuts it.
        fast.send(json.dumps({"type": "publish", "channel": "flood", "data": "last"}))
        metrics = wait_for(lambda: (m := server.metrics()).get(
            "fastfan_slow_consumers_disconnected_total") and m)
    assert metrics["fastfan_slow_consumers_disconnected_total"] == 1


@pytest.mark.slow
def test_a_plain_client_on_the_tls_port_fails_and_the_server_goes_on(start_tls: Any) -> None:
    server = start_tls()
    with socket.create_connection((server.host, server.port), timeout=5) as plain:
        plain.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        try:
            while chunk := plain.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
    assert b"HTTP/1.1" not in answer  # nothing in clear text: the connection just ends
    assert server.get("/health")[0] == 200
    assert server.process.poll() is None


async def _tls_proxy(server: TlsServer) -> asyncio.Server:
    """A plain listener whose connections go on to `server` over TLS: kosoku speaks ws://
    only, so Autobahn's cases reach fastfan's TLS path through this."""
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            server.host, server.port, ssl=server.context)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.slow
def test_autobahn_cases_pass_over_tls(start_tls: Any) -> None:
    server = start_tls("--echo-path", "/echo", "--max-message-size", str(17 << 20),
                       "--max-buffer", str(64 << 20), "--log-level", "warning")

    async def run() -> list[Any]:
        proxy = await _tls_proxy(server)
        port = proxy.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/echo?token={token()}"
        try:
            every = await asyncio.to_thread(run_cases, url, None, ["12.*", "13.*"])
            return every + await asyncio.to_thread(run_cases, url, COMPRESSION_SAMPLE)
        finally:
            proxy.close()

    results = asyncio.run(run())
    assert len(results) > 290 + len(COMPRESSION_SAMPLE)
    assert failures(results) == []


@pytest.mark.slow
def test_every_worker_serves_tls(start_tls: Any) -> None:
    server = start_tls("--workers", "2")
    prefixes = set()
    for i in range(12):  # the kernel spreads connections over the workers (SO_REUSEPORT)
        with websocket_connect(server.url(token=token(f"w{i}")), ssl=server.context) as ws:
            prefixes.add(messages_of(ws)[0]["data"]["clientId"].split("-")[0])
    assert len(prefixes) == 2
