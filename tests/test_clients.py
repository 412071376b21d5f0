"""Real clients of every kind a user brings: picows, Node's `ws` (the seed's), Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from support.server import Server, messages_of, token

from fastfan._picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

JS = Path(__file__).parent / "js"


def test_picows_client(server: Server) -> None:
    class Listener(WSListener):  # type: ignore[misc]
        def __init__(self) -> None:
            self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.TEXT:
                self.messages.put_nowait(json.loads(frame.get_payload_as_bytes()))

    async def run() -> list[dict[str, Any]]:
        transport, listener = await ws_connect(
            Listener, server.url(), extra_headers={"Authorization": f"Bearer {token('pico')}"})
        received = [await listener.messages.get()]
        transport.send(WSMsgType.TEXT, b'{"type":"subscribe","channel":"pico"}')
        received.append(await listener.messages.get())
        for i in range(100):
            transport.send(WSMsgType.TEXT, b'{"type":"publish","channel":"pico","data":%d}' % i)
        received += [await listener.messages.get() for _ in range(100)]
        transport.send_close()
        await transport.wait_disconnected()
        return received

    received = asyncio.run(asyncio.wait_for(run(), 10))
    assert received[0]["type"] == "welcome" and received[0]["data"]["user"] == "pico"
    assert received[1] == {"type": "subscribed", "channel": "pico"}
    assert [m["data"] for m in received[2:]] == list(range(100))


def test_node_ws_client_written_for_the_seed(server: Server) -> None:
    result = subprocess.run(
        ["node", str(JS / "seed_client.js"), server.url(), token("node"), "seed.chat", "50"],
        capture_output=True, text=True, timeout=30, check=True)
    report = json.loads(result.stdout)
    seen = report["seen"]
    assert seen["welcome"]["data"]["user"] == "node"
    assert seen["subscribed"] == {"type": "subscribed", "channel": "seed.chat"}
    assert seen["messages"] == [{"i": i, "text": "héllo"} for i in range(50)]
    assert seen["published"] == 50
    assert report["closeCode"] == 1000


@pytest.mark.slow
def test_node_ws_client_sees_join_leave_presence_and_stats(start_server: Any) -> None:
    """The seed's connection manager from a Node `ws` client, across two workers."""
    server = start_server("--workers", "2")
    watcher = subprocess.Popen(
        ["node", str(JS / "presence_client.js"), server.url(), token("node"), "lobby", "4"],
        stdout=subprocess.PIPE, text=True)
    assert watcher.stdout is not None
    assert json.loads(watcher.stdout.readline()) == {"ready": True}
    peers = [server.connect(f"peer{n}").subscribe("lobby") for n in range(4)]
    try:
        # the watcher asks for presence after the fourth join
        assert json.loads(watcher.stdout.readline()) == {"presence": 5}  # it and the four
        for peer in peers:
            peer.close()
        report = json.loads(watcher.stdout.readline())
    finally:
        watcher.wait(20)
    seen = report["seen"]
    joins = [user for kind, user in seen["events"] if kind == "join"]
    leaves = [user for kind, user in seen["events"] if kind == "leave"]
    assert sorted(joins) == sorted(leaves) == [f"peer{n}" for n in range(4)]
    assert seen["presence"]["id"] == "p"
    assert {c["user"] for c in seen["presence"]["data"]["clients"]} == {
        "node", "peer0", "peer1", "peer2", "peer3"}  # whichever worker holds each
    assert seen["stats"]["data"]["channels"] == ["lobby"]
    assert seen["stats"]["data"]["user"] == "node"
    assert report["closeCode"] == 1000


@pytest.mark.slow
def test_headless_chromium_connects_with_a_query_token(server: Server) -> None:
    page = (JS / "browser_client.html").as_uri()
    query = f"?server={server.url()}&token={token('browser', publish=['browser.*'])}"
    with server.websocket("observer") as observer, \
            tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        observer.send(json.dumps({"type": "subscribe", "channel": "browser.report"}))
        assert messages_of(observer, 1)[0]["type"] == "subscribed"
        browser = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", page + query],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            report = messages_of(observer, 1, timeout=60)[0]
        finally:
            os.killpg(browser.pid, signal.SIGKILL)  # chromium and every helper it started
            browser.wait()
    data = report["data"]
    assert data["welcome"]["data"]["user"] == "browser"
    assert data["message"]["data"] == {"from": "browser", "n": 42}
    assert data["message"]["from"] == data["welcome"]["data"]["clientId"]
    assert "Chrome" in data["userAgent"]
