"""permessage-deflate (RFC 7692): negotiated with no context takeover both ways, each message
compressed once per worker for every subscriber that negotiated it, client frames inflated
within --max-message-size; real clients (websockets, Node's ws, Chromium) and raw frames."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from browser import CHROMIUM, Browser
from support.server import Server, messages_of, token
from support.wire import (
    BINARY,
    CONTINUATION,
    PING,
    RSV1,
    TEXT,
    RawClient,
    deflate,
    frame,
    inflate,
)
from websockets.sync.client import connect as websocket_connect

JS = Path(__file__).parent / "js"
OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
ACCEPTED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def connect(server: Server, sub: str, headers: dict[str, str] | None = None,
            path: str = "/") -> RawClient:
    client = RawClient(server.host, server.port, f"{path}?token={token(sub)}", headers=headers)
    if path == "/":
        assert client.recv_json()["type"] == "welcome"
    return client


def published(text: str) -> dict[str, Any]:
    return {"text": text}


@pytest.mark.parametrize(("offer", "answer"), [
    ("permessage-deflate", ACCEPTED),
    ("permessage-deflate; client_max_window_bits", ACCEPTED),
    ("x-webkit-deflate-frame, permessage-deflate; server_no_context_takeover", ACCEPTED),
    ("permessage-deflate; client_max_window_bits=10; client_no_context_takeover", ACCEPTED),
    ("permessage-deflate; server_max_window_bits=15", ACCEPTED + "; server_max_window_bits=15"),
    ("permessage-deflate; server_max_window_bits=9", ACCEPTED + "; server_max_window_bits=9"),
    # a bad offer is declined and the next one taken
    ("permessage-deflate; server_max_window_bits=16, permessage-deflate", ACCEPTED),
    ("permessage-deflate; unknown=1", None),
    ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", None),
    ("permessage-deflate; server_max_window_bits", None),
    ("permessage-deflate; server_max_window_bits=8", None),
    ("permessage-deflate; client_no_context_takeover=1", None),
    ("x-webkit-deflate-frame", None),
])
def test_the_offer_is_answered_with_no_context_takeover(
        shared_server: Server, offer: str, answer: str | None) -> None:
    client = connect(shared_server, "alice", {"Sec-WebSocket-Extensions": offer})
    assert client.headers.get("sec-websocket-extensions") == answer


@pytest.mark.slow
def test_without_an_offer_or_with_compression_off_the_bytes_are_todays(
        start_server: Any) -> None:
    on, off = start_server(), start_server("--compression", "off")
    for server, headers in ((on, None), (off, OFFER)):
        client = connect(server, "alice", headers)
        assert set(client.headers) == {"connection", "upgrade", "sec-websocket-accept"}
        client.subscribe("news")
        client.publish("news", published("x" * 1000))
        got = client.recv_whole_frame()
        assert (got.rsv, got.opcode) == (0, TEXT)
        assert json.loads(got.payload)["data"] == published("x" * 1000)


@pytest.mark.parametrize("size", [1000, 30_000])  # a frame copied; one queued by reference
def test_a_message_is_compressed_for_those_that_negotiated_and_plain_for_the_rest(
        server: Server, size: int) -> None:
    deflating = [connect(server, f"d{i}", OFFER).subscribe("news") for i in range(2)]
    plain = connect(server, "p").subscribe("news")
    # half random: compressible, but from 30,000 characters still more than 4 KiB compressed
    text = "".join(os.urandom(1).hex() + "ab" for _ in range(size // 4))
    plain.publish("news", published(text))
    expected = plain.recv_whole_frame()
    assert expected.rsv == 0 and json.loads(expected.payload)["data"] == published(text)
    frames = [client.recv_whole_frame() for client in deflating]
    assert frames[0].payload == frames[1].payload  # one compression for both
    assert frames[0].rsv == RSV1 and frames[0].opcode == TEXT
    assert len(frames[0].payload) < 0.8 * len(expected.payload)
    assert inflate(frames[0].payload) == expected.payload
    if size > 4096:
        assert len(frames[0].payload) > 4096  # SHARED_FRAME_BYTES: the shared path


def test_messages_below_the_minimum_size_go_plain(start_server: Any) -> None:
    server = start_server("--compression-min-size", "400")
    client = connect(server, "alice", OFFER).subscribe("news")
    for data, compressed in (("y" * 200, False), ("y" * 400, True)):
        client.publish("news", published(data))
        got = client.recv_whole_frame()
        payload = inflate(got.payload) if got.rsv else got.payload
        assert json.loads(payload)["data"] == published(data)
        assert got.rsv == (RSV1 if compressed else 0)
        assert (len(payload) >= 400) == compressed  # the envelope counts


def test_replies_and_the_echo_path_are_compressed_too(start_server: Any) -> None:
    server = start_server("--echo-path", "/echo")
    client = connect(server, "alice", OFFER)
    client.send_json({"type": "subscribe", "channel": "c" * 250, "id": "x" * 300})
    got = client.recv_whole_frame()
    assert got.rsv == RSV1
    assert json.loads(inflate(got.payload))["type"] == "subscribed"
    echo = connect(server, "bob", OFFER, path="/echo")
    message = b"echo " * 100
    echo.send_frame(BINARY, deflate(message), rsv=RSV1)
    got = echo.recv_whole_frame()
    assert (got.rsv, got.opcode, inflate(got.payload)) == (RSV1, BINARY, message)
    for opcode, message in ((TEXT, b"short"), (BINARY, os.urandom(1000))):
        echo.send_frame(opcode, message)  # plain in, small or not compressible: compressed
        got = echo.recv_whole_frame()     # all the same, as conformance suites expect
        assert (got.rsv, got.opcode, inflate(got.payload)) == (RSV1, opcode, message)


def test_a_client_that_limits_our_window_gets_plain_frames_and_small_window_echoes(
        start_server: Any) -> None:
    server = start_server("--echo-path", "/echo")
    limited = {"Sec-WebSocket-Extensions": "permessage-deflate; server_max_window_bits=10"}
    client = connect(server, "alice", limited).subscribe("news")
    text = "".join(f"{i:04d}" for i in range(1000)) * 3  # repeats 4,000 bytes back
    client.publish("news", published(text))
    got = client.recv_whole_frame()
    assert got.rsv == 0 and json.loads(got.payload)["data"] == published(text)
    echo = connect(server, "bob", limited, path="/echo")
    echo.send_frame(TEXT, deflate(text.encode()), rsv=RSV1)
    got = echo.recv_whole_frame()
    assert got.rsv == RSV1 and got.payload == deflate(text.encode(), window_bits=9)
    assert deflate(text.encode(), window_bits=9) != deflate(text.encode())


def test_compressed_client_messages_are_inflated_whole_or_fragmented(server: Server) -> None:
    client = connect(server, "alice", OFFER).subscribe("news")
    request = json.dumps({"type": "publish", "channel": "news", "data": "é" * 400,
                          "id": 1}).encode()
    client.send_frame(TEXT, deflate(request), rsv=RSV1)
    compressed = deflate(request)
    client.send_frame(TEXT, compressed[:10], fin=False, rsv=RSV1)
    client.send_frame(CONTINUATION, compressed[10:20], fin=False)
    client.send_frame(CONTINUATION, compressed[20:])
    replies = []
    for _ in range(4):
        got = client.recv_whole_frame()
        replies.append(json.loads(inflate(got.payload) if got.rsv else got.payload))
    assert [r["type"] for r in replies] == ["message", "published"] * 2
    assert replies[0]["data"] == "é" * 400


@pytest.mark.parametrize(("frames", "code"), [
    # a zip bomb: 1 MiB of zeros in about 1 KiB stops at --max-message-size
    ([(TEXT, deflate(b"0" * (1 << 20)), True, RSV1)], 1009),
    ([(TEXT, deflate(b'{"type":"ping"}' + b" " * 70_000), True, RSV1)], 1009),
    ([(TEXT, b"\xff\xff\xff\xff not deflate", True, RSV1)], 1007),
    ([(TEXT, deflate(b'{"type":"ping","x":"\xff"}'), True, RSV1)], 1007),
    ([(TEXT, deflate(b'{"type":'), False, RSV1), (CONTINUATION, b"\x00", True, RSV1)], 1002),
    ([(PING, b"", True, RSV1)], 1002),
    ([(TEXT, deflate(b"{}"), True, 0b010)], 1002),  # RSV2: no extension of ours uses it
])
def test_what_does_not_inflate_within_the_limit_closes(
        shared_server: Server, frames: list[tuple[int, bytes, bool, int]], code: int) -> None:
    client = connect(shared_server, "alice", OFFER)
    for opcode, payload, fin, rsv in frames:
        client.send_frame(opcode, payload, fin=fin, rsv=rsv)
    assert client.recv_close()[0] == code
    assert shared_server.get("/health")[0] == 200


def test_rsv1_without_the_extension_is_a_protocol_error(server: Server) -> None:
    client = connect(server, "alice")
    client.send_frame(TEXT, deflate(b'{"type":"ping"}'), rsv=RSV1)
    assert client.recv_close()[0] == 1002


def test_the_websockets_client_negotiates_by_default(server: Server) -> None:
    text = "ça bouge " * 200
    with websocket_connect(server.url(token=token("ws"))) as ws:
        assert ws.protocol.extensions[0].name == "permessage-deflate"
        assert messages_of(ws)[0]["type"] == "welcome"
        ws.send(json.dumps({"type": "subscribe", "channel": "news"}))
        assert messages_of(ws)[0]["type"] == "subscribed"
        ws.send(json.dumps({"type": "publish", "channel": "news", "data": text, "id": 7}))
        got = messages_of(ws, 2)
    assert [m["type"] for m in got] == ["message", "published"]
    assert got[0]["data"] == text


def test_node_ws_with_per_message_deflate(server: Server) -> None:
    result = subprocess.run(
        ["node", str(JS / "deflate_client.js"), server.url(), token("node"), "news", "20",
         "2000"], capture_output=True, text=True, timeout=30, check=True)
    report = json.loads(result.stdout)
    assert report["extensions"] == ACCEPTED
    assert report["messages"] == [True] * 20
    assert report["closeCode"] == 1000


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (./dev test installs it)")
@pytest.mark.slow
def test_chromium_compresses_both_ways(server: Server) -> None:
    url = server.url(token=token("chromium"))
    with Browser.showing("about:blank") as page:
        report = page.evaluate(f"""new Promise((resolve, reject) => {{
            const ws = new WebSocket({json.dumps(url)}), text = 'héllo '.repeat(2000)
            const got = []
            ws.onerror = () => reject(new Error('websocket error'))
            ws.onmessage = (event) => {{
              const message = JSON.parse(event.data)
              got.push(message.type)
              if (message.type === 'welcome') {{
                ws.send(JSON.stringify({{type: 'subscribe', channel: 'news'}}))
              }} else if (message.type === 'subscribed') {{
                ws.send(JSON.stringify({{type: 'publish', channel: 'news', data: text}}))
              }} else if (message.type === 'message') {{
                resolve({{extensions: ws.extensions, same: message.data === text, got}})
              }}
            }}
          }})""")
    assert report == {"extensions": ACCEPTED, "same": True,
                      "got": ["welcome", "subscribed", "message"]}


def test_inflating_is_metered_a_flood_of_tiny_frames_that_inflate_large_is_refused(
        server: Server) -> None:
    """100 bytes on the wire inflate to 60 KB: past what one connection may inflate a
    second (--publish-rate x 4 KiB, bursts of twice that) such messages are refused with
    429, without being inflated, and the connection stays (issue #25, finding 11)."""
    client = connect(server, "alice", OFFER)
    padding = "a" * 60_000
    bomb = frame(TEXT, deflate(json.dumps({"type": "ping", "id": 1, "pad": padding}).encode()),
                 rsv=RSV1)
    assert len(bomb) < 400
    sent = 2_000  # 120 MB inflated; the burst allows 8 MiB, about 140 of them
    client.sock.sendall(bomb * sent)
    replies = [client.recv_json() for _ in range(sent)]
    pongs = [reply for reply in replies if reply["type"] == "pong"]
    refused = [reply for reply in replies if reply["type"] == "error"]
    assert len(pongs) + len(refused) == sent
    assert 100 <= len(pongs) <= 600, len(pongs)
    assert {reply["code"] for reply in refused} == {429}
    assert refused[0]["message"].startswith("compressed input rate limit exceeded")
    client.send_json({"type": "ping", "id": 2})
    assert client.recv_json() == {"type": "pong", "id": 2}
