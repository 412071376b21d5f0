"""`refresh`: a new token for the same user without reconnecting."""

from __future__ import annotations

import time
from typing import Any

import pytest
from support.server import token
from support.wire import RawClient


def test_refresh_narrows_permissions_and_ends_what_they_no_longer_allow(server: Any) -> None:
    client = server.connect("dana")
    client.subscribe("news.world", "chat.lobby")
    fresh = token("dana", subscribe=["news.*"], ttl=600)
    client.send_json({"type": "refresh", "token": fresh, "id": "r1"})
    ended = client.recv_json()
    assert ended == {"type": "unsubscribed", "channel": "chat.lobby", "reason": "permission"}
    reply = client.recv_json()
    assert reply["type"] == "refreshed" and reply["id"] == "r1"
    assert abs(reply["expires"] / 1000 - (time.time() + 600)) < 5
    client.send_json({"type": "stats"})
    assert client.recv_json()["data"]["channels"] == ["news.world"]
    client.send_json({"type": "subscribe", "channel": "chat.lobby"})
    assert client.recv_json()["code"] == 403  # the new permissions hold


def test_a_refused_refresh_leaves_the_connection_as_it_was(server: Any) -> None:
    client = server.connect("dana")
    client.subscribe("chat.lobby")
    for bad, reason in ((token("erin"), "another user"), ("not-a-jwt", "malformed"),
                        (token("dana", secret="x" * 40), "signature")):
        client.send_json({"type": "refresh", "token": bad, "id": 2})
        reply = client.recv_json()
        assert (reply["type"], reply["code"], reply["id"]) == ("error", 401, 2)
        assert reason in reply["message"]
    client.send_json({"type": "refresh", "id": 3})
    assert client.recv_json()["code"] == 400
    client.send_json({"type": "stats"})
    assert client.recv_json()["data"]["channels"] == ["chat.lobby"]


@pytest.mark.slow
def test_refresh_before_expiry_keeps_the_connection_open(server: Any) -> None:
    def short_lived() -> RawClient:
        client = RawClient(server.host, server.port, f"/?token={token('dana', ttl=2)}")
        assert client.recv_json()["type"] == "welcome"
        return client

    refreshed, left = short_lived(), short_lived()
    refreshed.send_json({"type": "refresh", "token": token("dana", ttl=600)})
    assert refreshed.recv_json()["type"] == "refreshed"
    assert left.recv_close() == (4001, "token expired")  # the old token's end, unrefreshed
    refreshed.send_json({"type": "ping"})
    assert refreshed.recv_json() == {"type": "pong"}
