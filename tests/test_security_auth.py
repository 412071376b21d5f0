"""What a stranger can do before and around the token check: a 401 for every bad token, no
traceback, no stalled worker, no token in the log, a 431 for an oversized head, and a
server that refuses to start with a weak or contradictory auth set-up."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support.auth import raw_exchange, signed, upgrade_head
from support.cli import fastfan
from support.patched import assert_a_header_block_over_16_kib_gets_431
from support.server import SECRET, Server, token
from support.wire import HandshakeRefusedError, RawClient

FRESH = int(time.time()) + 3600


def claims(**values: Any) -> str:
    return signed(json.dumps({"sub": "alice", "exp": FRESH, **values}).encode())


def bearer(value: bytes) -> bytes:
    return b"Authorization: Bearer " + value + b"\r\n"


# name: (path, extra header bytes, a word of the reason)
BAD = {
    "non-ASCII byte in the header": ("/", bearer(b"\xff"), "malformed"),
    "non-ASCII byte in a real token": ("/", bearer(token().encode() + b"\xfe"), "malformed"),
    "exp a string": ("/", bearer(claims(exp=str(FRESH)).encode()), "'exp'"),
    "exp 1e400": ("/", bearer(signed(b'{"sub":"alice","exp":1e400}').encode()), "'exp'"),
    "exp a huge integer": ("/", bearer(signed(b'{"sub":"a","exp":' + b"9" * 400 + b"}")
                                       .encode()), "'exp'"),
    "exp NaN": ("/", bearer(signed(b'{"sub":"alice","exp":NaN}').encode()), "'exp'"),
    "exp true": ("/", bearer(claims(exp=True).encode()), "'exp'"),
    "nbf a string": ("/", bearer(claims(nbf="0").encode()), "'nbf'"),
    "nbf in the future": ("/", bearer(claims(nbf=FRESH).encode()), "nbf"),
    "iat a list": ("/", bearer(claims(iat=[1]).encode()), "'iat'"),
    "iat in the future": ("/", bearer(claims(iat=FRESH).encode()), "iat"),
    "sub a number": ("/", bearer(claims(sub=42).encode()), "'sub'"),
    "sub empty": ("/", bearer(claims(sub="").encode()), "'sub'"),
    "subscribe a string": ("/", bearer(claims(subscribe="*").encode()), "'subscribe'"),
    "publish a list of numbers": ("/", bearer(claims(publish=[1]).encode()), "'publish'"),
    "9 KiB token": ("/", bearer(b"a" * 9216), "8192"),
    "bad percent-encoding: %ff": ("/?token=%ff%fe", b"", "malformed"),
    "bad percent-encoding: %zz": ("/?token=%zz", b"", "malformed"),
    "bad percent-encoding: lone %": ("/ws?token=abc%", b"", "malformed"),
    "raw non-ASCII in the query": ("/?token=\xff", b"", "malformed"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_every_bad_token_is_a_counted_401_without_a_traceback(shared_server: Server,
                                                              name: str) -> None:
    path, extra, reason = BAD[name]
    failures = shared_server.metrics()["fastfan_auth_failures_total"]
    log_size = len(shared_server.log())
    head = upgrade_head(shared_server, "PATH", extra).replace(b"PATH", path.encode("latin-1"))
    status_line, headers, body = raw_exchange(shared_server, head)
    assert status_line.startswith("HTTP/1.1 401 "), (status_line, body)
    assert headers["www-authenticate"] == "Bearer"
    text = body.decode()
    assert text.startswith("401 Unauthorized: ") and reason in text, text
    assert text.count("\n") == 1 and text.endswith("\n")
    assert shared_server.metrics()["fastfan_auth_failures_total"] == failures + 1
    assert "Traceback" not in shared_server.log()[log_size:]


def test_a_good_token_still_passes_after_the_stricter_checks(shared_server: Server) -> None:
    good = claims(nbf=FRESH - 7200, iat=FRESH - 3600.5, subscribe=["chat.*"], publish=[])
    client = RawClient(shared_server.host, shared_server.port, "/",
                       {"Authorization": f"Bearer {good}"})
    assert client.recv_json()["data"]["user"] == "alice"
    client.close()


def test_an_adversarial_pattern_does_not_stall_the_worker(shared_server: Server) -> None:
    """`*.*.*.*.x` against 254 dots took 1.5 s per subscribe as a backtracking regex."""
    evil = claims(subscribe=["*.*.*.*.x"], publish=["*.*.*.*.x"])
    client = RawClient(shared_server.host, shared_server.port, "/",
                       {"Authorization": f"Bearer {evil}"}, timeout=30)
    client.recv_json()
    started = time.monotonic()
    for _ in range(3):
        client.send_json({"type": "subscribe", "channel": "." * 254})
    for _ in range(3):
        assert client.recv_json()["code"] == 403
    assert shared_server.get("/health")[0] == 200
    assert time.monotonic() - started < 1.5  # milliseconds now; 4.5 s with the regex
    client.close()


def test_a_header_block_over_16_kib_gets_431(shared_server: Server) -> None:
    assert_a_header_block_over_16_kib_gets_431(shared_server)


def test_debug_logging_never_writes_a_token(start_server: Any) -> None:
    server = start_server("--log-level", "debug")
    in_header, in_query = token("header-user"), token("query-user")
    for headers, path in (({"Authorization": f"Bearer {in_header}"}, "/"),
                          (None, f"/ws?x=1&token={in_query}")):
        client = RawClient(server.host, server.port, path, headers)
        assert client.recv_json()["type"] == "welcome"
        client.close()
    log = server.log()
    assert "New data" in log  # picows did log the requests at debug level...
    assert "[redacted]" in log
    for secret_part in (in_header, in_query, in_header.split(".")[2], in_query.split(".")[2]):
        assert secret_part not in log  # ...without the tokens


# The command line.

def assert_one_line_refusal(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usage:")
    reason = result.stderr.rstrip("\n").split("\n")[-1]
    for word in words:
        assert word in reason, reason


@pytest.mark.parametrize("args, env", [
    (["--insecure", "--jwt-secret", SECRET], {}),
    (["--jwt-secret", SECRET], {"FASTFAN_INSECURE": "true"}),
    (["--insecure"], {"FASTFAN_JWT_SECRET": SECRET}),
])
def test_insecure_with_a_secret_refuses_to_start(args: list[str], env: dict[str, str]) -> None:
    assert_one_line_refusal(fastfan("run", "--port", "0", *args, env=env),
                            "--insecure", "drop --insecure")


@pytest.mark.parametrize("command", [["run", "--port", "0"], ["token", "--sub", "alice"]])
@pytest.mark.slow
def test_a_secret_under_32_bytes_is_refused(command: list[str]) -> None:
    short = "s" * 31
    assert_one_line_refusal(fastfan(*command, "--jwt-secret", short), "31 bytes", "32",
                            "RFC 7518")
    assert_one_line_refusal(fastfan(*command, env={"FASTFAN_JWT_SECRET": short}), "32")
    assert len(SECRET.encode()) >= 32  # what the other tests' servers run with


@pytest.mark.slow
def test_secret_from_a_file(start_server: Any, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    by_flag = start_server("--jwt-secret-file", str(secret_file), secret=None)
    by_env = start_server(secret=None, env={"FASTFAN_JWT_SECRET_FILE": str(secret_file)})
    for server in (by_flag, by_env):
        client = RawClient(server.host, server.port, f"/?token={token('filed')}")
        assert client.recv_json()["data"]["user"] == "filed"
        client.close()
        with pytest.raises(HandshakeRefusedError) as refused:
            RawClient(server.host, server.port, "/", headers={"Authorization": "Bearer x"})
        assert refused.value.status == 401
        assert f"--jwt-secret {SECRET}" not in Path(f"/proc/{server.process.pid}/cmdline") \
            .read_text().replace("\0", " ")
    minted = fastfan("token", "--sub", "bob", "--jwt-secret-file", str(secret_file))
    assert minted.returncode == 0, minted.stderr
    client = RawClient(by_flag.host, by_flag.port, f"/?token={minted.stdout.strip()}")
    assert client.recv_json()["data"]["user"] == "bob"
    client.close()


@pytest.mark.slow
def test_secret_file_problems_are_one_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    assert_one_line_refusal(fastfan("run", "--jwt-secret-file", missing), missing,
                            "No such file")
    assert_one_line_refusal(fastfan("run", env={"FASTFAN_JWT_SECRET_FILE": missing}),
                            "FASTFAN_JWT_SECRET_FILE", missing)
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff" * 40)
    assert_one_line_refusal(fastfan("run", "--jwt-secret-file", str(binary)), "UTF-8")
    both = tmp_path / "secret"
    both.write_text(SECRET)
    assert_one_line_refusal(fastfan("run", "--jwt-secret-file", str(both),
                                    env={"FASTFAN_JWT_SECRET": SECRET}), "not both")


@pytest.mark.slow
def test_run_help_says_to_keep_the_secret_out_of_ps() -> None:
    result = fastfan("run", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--jwt-secret-file" in text
    assert "prefer FASTFAN_JWT_SECRET or --jwt-secret-file" in text
