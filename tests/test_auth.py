"""Tokens: every way to be refused comes as a 401 before the upgrade, with a reason."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from support.server import SECRET, Server, token
from support.wire import HandshakeRefusedError, RawClient


def refusal(server: Server, path: str = "/", headers: dict[str, str] | None = None) -> Any:
    with pytest.raises(HandshakeRefusedError) as refused:
        RawClient(server.host, server.port, path, headers)
    return refused.value


def unsigned(claims: dict[str, Any]) -> str:
    """A token with alg "none": header and claims, no signature."""
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


BAD_TOKENS = {
    "missing": (None, "missing token"),
    "malformed": ("not.a.jwt", "malformed"),
    "garbage": ("abc", "malformed"),
    "bad signature": (token("alice", secret="another-secret-of-sufficient-length-xx"),
                      "signature"),
    "expired": (jwt.encode({"sub": "alice", "exp": int(time.time()) - 10}, SECRET, "HS256"),
                "expired"),
    "no sub": (jwt.encode({"exp": int(time.time()) + 60}, SECRET, "HS256"), "sub"),
    "alg HS512": (jwt.encode({"sub": "alice"}, SECRET + "x" * 40, "HS512"), "HS256"),
    "alg none": (unsigned({"sub": "alice"}), "HS256"),
    "subscribe not a list": (jwt.encode({"sub": "a", "subscribe": "*"}, SECRET, "HS256"),
                             "subscribe"),
}


@pytest.mark.parametrize("name", list(BAD_TOKENS))
def test_bad_tokens_get_401_with_a_reason(shared_server: Server, name: str) -> None:
    bad, reason = BAD_TOKENS[name]
    headers = {"Authorization": f"Bearer {bad}"} if bad else None
    refused = refusal(shared_server, headers=headers)
    assert refused.status == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    body = refused.body.decode()
    assert reason in body
    assert body.count("\n") == 1 and body.endswith("\n")


def test_token_in_the_query_string(server: Server) -> None:
    client = RawClient(server.host, server.port, f"/ws?token={token('carol')}")
    assert client.recv_json()["data"]["user"] == "carol"
    client.close()
    assert refusal(server, f"/ws?token={BAD_TOKENS['expired'][0]}").status == 401


def test_the_header_wins_over_the_query_string(server: Server) -> None:
    good, expired = token("header-user"), BAD_TOKENS["expired"][0]
    client = RawClient(server.host, server.port, f"/?token={expired}",
                       {"Authorization": f"Bearer {good}"})
    assert client.recv_json()["data"]["user"] == "header-user"
    client.close()
    refused = refusal(server, f"/?token={good}", {"Authorization": f"Bearer {expired}"})
    assert refused.status == 401


def test_authorization_must_be_bearer(server: Server) -> None:
    refused = refusal(server, headers={"Authorization": f"Basic {token()}"})
    assert refused.status == 401 and b"Bearer" in refused.body


def test_auth_failures_are_counted(server: Server) -> None:
    for _ in range(3):
        refusal(server)
    assert server.metrics()["fastfan_auth_failures_total"] == 3


@pytest.mark.slow
def test_token_expiring_while_connected_closes_4001(server: Server) -> None:
    short = jwt.encode({"sub": "brief", "exp": int(time.time()) + 2}, SECRET, "HS256")
    client = RawClient(server.host, server.port, "/", {"Authorization": f"Bearer {short}"},
                       timeout=10)
    assert client.recv_json()["type"] == "welcome"
    assert client.recv_close() == (4001, "token expired")
    client.close()


def test_insecure_accepts_clients_without_a_token(start_server: Any) -> None:
    server = start_server("--insecure", secret=None)
    client = RawClient(server.host, server.port, "/")
    assert client.recv_json()["data"]["user"] == "anonymous"
    client.close()
