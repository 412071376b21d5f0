"""examples/chat runs as its README says, through both doors: its hooks in Python
(`--app hooks:app`) and its aiohttp backend behind the HTTP proxies, with the same answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.messages import ask
from support.server import Server
from support.waiting import wait_for
from support.wire import HandshakeRefusedError, RawClient, free_port

CHAT = Path(__file__).parent.parent / "examples" / "chat"


@pytest.fixture(params=["hooks in Python", "HTTP proxies"])
def chat(request: pytest.FixtureRequest, start_server: Any, tmp_path: Path) -> Iterator[Server]:
    env = {"CHAT_DB": str(tmp_path / "chat.db"), "PYTHONPATH": str(CHAT)}
    if request.param == "hooks in Python":
        yield start_server("--app", "hooks:app", secret=None, env=env)
        return
    port = free_port()
    backend = subprocess.Popen([sys.executable, "backend.py", "--port", str(port)], cwd=CHAT,
                               env={**os.environ, **env})
    try:
        wait_for(lambda: _listening(port))
        url = f"http://127.0.0.1:{port}"
        yield start_server(*(arg for kind in ("connect", "subscribe", "publish", "rpc")
                             for arg in (f"--proxy-{kind}", f"{url}/{kind}")),
                           secret=None, env=env)
    finally:
        backend.terminate()
        backend.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def join(chat: Server, key: str) -> RawClient:
    client = RawClient(chat.host, chat.port, "/", headers={"Cookie": f"chat_session={key}"})
    assert client.recv_json()["type"] == "welcome"
    assert client.recv_json()["type"] == "subscribed"  # its inbox
    return client


def test_the_example_client_talks_with_the_chat(chat: Server) -> None:
    result = subprocess.run([sys.executable, "client.py", "alice-key",
                             f"ws://{chat.host}:{chat.port}/"], cwd=CHAT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "members: ['Alice', 'Bob']", "{'text': 'hello, **** of a day', 'by': 'Alice'}"]


def test_the_chats_refusals(chat: Server) -> None:
    with pytest.raises(HandshakeRefusedError) as refused:
        RawClient(chat.host, chat.port, "/", headers={"Cookie": "chat_session=forged"})
    assert refused.value.status == 401
    bob = join(chat, "bob-key")
    for channel, message in (("inbox.alice", "someone else's inbox"),
                             ("room.staff", "staff only")):
        assert ask(bob, {"type": "subscribe", "channel": channel}) == {
            "type": "error", "code": 403, "message": message, "id": 7}
    assert ask(bob, {"type": "publish", "channel": "room.lobby", "data": "hi"})["code"] == 400
    assert ask(bob, {"type": "rpc", "method": "members"})["data"] == ["Alice", "Bob"]
