"""Tokens made here and the upgrades that carry them: HS256 over exact payload bytes (JSON
PyJWT would not write), tokens signed by an identity provider's key types, a request head
sent byte for byte, and what the server's refusal says."""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from support.server import SECRET, Server
from support.wire import HandshakeRefusedError, RawClient

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

# The key types a provider signs with, and the algorithm each fixes.
KEY_TYPES = {
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate,
}


def base64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def signed(payload: bytes, secret: str = SECRET) -> str:
    """An HS256 token over these exact payload bytes (JSON PyJWT itself would not write)."""
    signing_input = base64url(b'{"alg":"HS256","typ":"JWT"}') + "." + base64url(payload)
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64url(mac)}"


def mint(key: PrivateKey, algorithm: str, sub: str = "alice", *, kid: str | None = None,
         ttl: float = 300, **claims: Any) -> str:
    body = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    return jwt.encode(body, key, algorithm=algorithm, headers={"kid": kid} if kid else None)


def outcome(server: Server, token: str) -> tuple[int, str]:
    """(101, the welcome's user) or (status, the refusal's body) for an upgrade."""
    try:
        client = RawClient(server.host, server.port, "/",
                           {"Authorization": f"Bearer {token}"})
    except HandshakeRefusedError as refused:
        body = refused.body.decode()
        assert refused.headers["www-authenticate"] == "Bearer"
        assert body.count("\n") == 1 and body.endswith("\n"), body
        return refused.status, body
    welcome = client.recv_json()
    client.close()
    return 101, welcome["data"]["user"]


def refused_for(server: Server, token: str, reason: str) -> None:
    status, body = outcome(server, token)
    assert status == 401 and reason in body, (status, body)


def upgrade_head(server: Server, path: str = "/", extra: bytes = b"") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            ).encode() + extra + b"\r\n"


def raw_exchange(server: Server, head: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send a request head as given, byte for byte; the status line, headers and body."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(head)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    response_head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = response_head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return status_line, headers, body
