"""Tokens from an identity provider: a PEM public key (RS256, ES256, EdDSA) or a JWKS by
`kid`, with --jwt-audience and --jwt-issuer. Keys are made here; servers are real."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.auth import KEY_TYPES, PrivateKey, base64url, mint, outcome, refused_for
from support.waiting import wait_for
from support.wire import RawClient, free_port

from fastfan.cli import main


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def hand_made(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A token PyJWT would refuse to make: HS256 keyed with a PEM's text, or alg none."""
    signing_input = (f"{base64url(json.dumps(header).encode())}."
                     f"{base64url(json.dumps(claims).encode())}")
    if secret is None:
        return signing_input + "."
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64url(signature)}"


def jwk(key: PrivateKey, algorithm: str, kid: str) -> dict[str, Any]:
    """The public half of `key` as a JWK with `kid` (no `alg`: the server infers it)."""
    public = json.loads(jwt.get_algorithm_by_name(algorithm).to_jwk(key.public_key()))
    return {**public, "kid": kid, "use": "sig"}


class Jwks:
    """A JWKS served over HTTP on 127.0.0.1 from a thread; counts the fetches."""

    def __init__(self, keys: list[dict[str, Any]], port: int | None = None) -> None:
        self.keys = keys
        self.fetches = 0
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/jwks.json"
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                jwks.fetches += 1
                body = json.dumps({"keys": jwks.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()


@pytest.fixture
def jwks_servers() -> Iterator[list[Jwks]]:
    servers: list[Jwks] = []
    yield servers
    for server in servers:
        if server._thread.is_alive():
            server.stop()


@pytest.mark.parametrize("algorithm", list(KEY_TYPES))
def test_a_public_key_takes_its_own_tokens_and_refuses_the_rest(
        start_server: Any, tmp_path: Path, algorithm: str) -> None:
    key, stranger = KEY_TYPES[algorithm](), KEY_TYPES[algorithm]()
    pem_file = tmp_path / "public.pem"
    pem_file.write_bytes(public_pem(key))
    server = start_server("--jwt-public-key", str(pem_file), secret=None)

    assert outcome(server, mint(key, algorithm, "alice")) == (101, "alice")
    refused_for(server, mint(stranger, algorithm), "signature is invalid")
    claims = {"sub": "mallory", "exp": int(time.time()) + 300}
    # The classic confusion: the public key's own text as an HMAC secret.
    refused_for(server, hand_made({"alg": "HS256", "typ": "JWT"}, claims, public_pem(key)),
                f"algorithm must be {algorithm}")
    refused_for(server, hand_made({"alg": "none", "typ": "JWT"}, claims, None),
                f"algorithm must be {algorithm}")
    refused_for(server, mint(key, algorithm, ttl=-10), "expired")
    refused_for(server, mint(key, algorithm, aud="somebody"), "'aud'")
    figures = wait_for(lambda: (m := server.metrics())["fastfan_auth_failures_total"] == 5
                       and m)
    assert figures["fastfan_auth_failures_total"] == 5
    assert "Traceback" not in server.log()


def test_audience_and_issuer_when_required(start_server: Any, tmp_path: Path) -> None:
    key = KEY_TYPES["ES256"]()
    pem_file = tmp_path / "public.pem"
    pem_file.write_bytes(public_pem(key))
    server = start_server("--jwt-public-key", str(pem_file), "--jwt-audience", "fanout",
                          "--jwt-issuer", "https://id.example", secret=None)
    issuer = "https://id.example"

    assert outcome(server, mint(key, "ES256", aud="fanout", iss=issuer)) == (101, "alice")
    assert outcome(server, mint(key, "ES256", aud=["other", "fanout"], iss=issuer))[0] == 101
    refused_for(server, mint(key, "ES256", aud="other", iss=issuer), "another audience")
    refused_for(server, mint(key, "ES256", iss=issuer), "no 'aud' claim")
    refused_for(server, mint(key, "ES256", aud="fanout", iss="https://evil.example"),
                "another issuer")
    refused_for(server, mint(key, "ES256", aud="fanout"), "no 'iss' claim")


def test_refresh_with_a_public_key_token(start_server: Any, tmp_path: Path) -> None:
    key = KEY_TYPES["EdDSA"]()
    pem_file = tmp_path / "public.pem"
    pem_file.write_bytes(public_pem(key))
    server = start_server("--jwt-public-key", str(pem_file), secret=None)
    client = RawClient(server.host, server.port, "/",
                       {"Authorization": f"Bearer {mint(key, 'EdDSA', ttl=60)}"})
    assert client.recv_json()["type"] == "welcome"

    fresh = mint(key, "EdDSA", ttl=3600)
    client.send_json({"type": "refresh", "token": fresh, "id": "r1"})
    reply = client.recv_json()
    assert reply["type"] == "refreshed" and reply["id"] == "r1"
    assert reply["expires"] == jwt.decode(fresh, options={"verify_signature": False})["exp"] \
        * 1000
    client.send_json({"type": "refresh", "token": mint(KEY_TYPES["EdDSA"](), "EdDSA"),
                      "id": "r2"})
    reply = client.recv_json()
    assert reply["type"] == "error" and reply["code"] == 401, reply
    assert "signature is invalid" in reply["message"]
    client.close()


def test_jwks_picks_keys_by_kid_and_takes_a_new_one_after_a_refetch(
        start_server: Any, jwks_servers: list[Jwks]) -> None:
    first, second = KEY_TYPES["RS256"](), KEY_TYPES["ES256"]()
    jwks = Jwks([jwk(first, "RS256", "k1"),
                 {"kty": "oct", "k": base64url(b"s" * 32), "kid": "sym"}])
    jwks_servers.append(jwks)
    server = start_server("--jwks-url", jwks.url, secret=None)
    assert jwks.fetches == 1  # at start, before the worker accepts

    assert outcome(server, mint(first, "RS256", "alice", kid="k1")) == (101, "alice")
    refused_for(server, mint(KEY_TYPES["RS256"](), "RS256", kid="k1"), "signature is invalid")
    refused_for(server, mint(second, "ES256", kid="k1"), "algorithm must be RS256")
    # A symmetric key in the set is never used; HS256 is not a provider's algorithm.
    refused_for(server, jwt.encode({"sub": "x"}, b"s" * 32, "HS256", headers={"kid": "sym"}),
                "algorithm must be RS256, ES256, EdDSA")
    refused_for(server, mint(first, "RS256"), "no 'kid'")
    assert jwks.fetches == 1

    # Rotation: the provider publishes k2; the first token with it starts the refetch.
    jwks.keys = [*jwks.keys, jwk(second, "ES256", "k2")]
    new_token = mint(second, "ES256", "bob", kid="k2")
    refused_for(server, new_token, "unknown key, try again")
    assert wait_for(lambda: outcome(server, new_token) == (101, "bob"), timeout=5)
    assert jwks.fetches == 2
    assert outcome(server, mint(first, "RS256", kid="k1"))[0] == 101


@pytest.mark.slow
def test_jwks_down_keeps_the_keys_known(start_server: Any,
                                        jwks_servers: list[Jwks]) -> None:
    key = KEY_TYPES["EdDSA"]()
    jwks = Jwks([jwk(key, "EdDSA", "k1")])
    jwks_servers.append(jwks)
    server = start_server("--jwks-url", jwks.url, secret=None)
    jwks.stop()

    assert outcome(server, mint(key, "EdDSA", kid="k1"))[0] == 101
    refused_for(server, mint(key, "EdDSA", kid="gone"), "unknown key, try again")
    assert wait_for(lambda: "not fetched" in server.log())  # the refetch failed, logged
    assert outcome(server, mint(key, "EdDSA", kid="k1"))[0] == 101
    assert "Traceback" not in server.log()


def test_a_flood_of_unknown_kids_fetches_at_most_once_per_10s(
        start_server: Any, jwks_servers: list[Jwks]) -> None:
    key = KEY_TYPES["ES256"]()
    jwks = Jwks([jwk(key, "ES256", "k1")])
    jwks_servers.append(jwks)
    server = start_server("--jwks-url", jwks.url, secret=None)

    for attempt in range(100):
        refused_for(server, mint(key, "ES256", kid=f"made-up-{attempt}"), "unknown key")
    wait_for(lambda: jwks.fetches >= 2)  # the one background fetch has landed
    assert jwks.fetches == 2  # the start's, and one refetch for the hundred
    assert outcome(server, mint(key, "ES256", kid="k1"))[0] == 101
    assert server.metrics()["fastfan_auth_failures_total"] >= 100
    assert jwks.fetches == 2


@pytest.mark.slow
def test_a_jwks_down_at_start_is_fetched_when_it_comes_back(
        start_server: Any, jwks_servers: list[Jwks]) -> None:
    key = KEY_TYPES["RS256"]()
    port = free_port()
    server = start_server("--jwks-url", f"http://127.0.0.1:{port}/jwks.json", secret=None)
    token = mint(key, "RS256", kid="k1")
    refused_for(server, token, "unknown key, try again")  # nothing known yet

    jwks_servers.append(Jwks([jwk(key, "RS256", "k1")], port=port))
    # The failed refetch this token started holds the next one off for 10 s.
    assert wait_for(lambda: outcome(server, token)[0] == 101, timeout=15, interval=0.5)


@pytest.mark.parametrize("args, reason", [
    (["--jwt-secret", "s" * 32, "--jwks-url", "https://id.example/jwks"],
     "give one token key, not --jwt-secret and --jwks-url"),
    (["--jwt-public-key", "PEM", "--jwks-url", "https://id.example/jwks"],
     "give one token key"),
    (["--insecure", "--jwks-url", "https://id.example/jwks"], "--insecure with --jwks-url"),
    (["--insecure", "--jwt-audience", "fanout"], "need a token key"),
    (["--jwks-url", "file:///etc/passwd"], "must be an https:// (or http://) URL"),
    (["--jwt-public-key", "/nonexistent.pem"], "cannot read /nonexistent.pem"),
    (["--jwt-public-key", "PRIVATE"], "not a PEM public key"),
    (["--jwt-public-key", "P384"], "not an RSA, EC P-256 or Ed25519 public key"),
    ([], "no token key given"),
])
def test_options_that_cannot_check_tokens_are_usage_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
        reason: str) -> None:
    files = {
        "PEM": public_pem(KEY_TYPES["EdDSA"]()),
        "PRIVATE": KEY_TYPES["RS256"]().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()),
        "P384": public_pem(ec.generate_private_key(ec.SECP384R1())),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    args = [str(tmp_path / arg) if arg in files else arg for arg in args]
    with pytest.raises(SystemExit) as exited:
        main(["run", *args])
    assert exited.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert reason in error, error
