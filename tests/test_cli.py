"""The command line: options, environment, refusals, tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import jwt
import pytest
from support.cli import assert_usage_error, fastfan
from support.server import SECRET
from support.wire import RawClient, free_port


def test_run_without_secret_or_insecure_refuses_and_says_how() -> None:
    result = fastfan("run", "--port", str(free_port()))
    assert_usage_error(result, "--jwt-secret-file", "--insecure")


@pytest.mark.parametrize("args", [["run", "--port", "http"], ["run", "--insecure",
                                                              "--workers", "1000"]])
def test_run_errors_show_the_usage_of_run(args: list[str]) -> None:
    result = fastfan(*args)
    assert_usage_error(result)
    assert result.stderr.startswith("usage: fastfan run ")
    assert "fastfan run: error: " in result.stderr


def test_version() -> None:
    result = fastfan("--version")
    assert (result.returncode, result.stdout) == (0, "fastfan 0.1.0\n")


def test_run_help_names_each_option_s_variable_and_its_values() -> None:
    help_text = " ".join(fastfan("run", "--help").stdout.split())
    for variable in ("FASTFAN_PORT", "FASTFAN_WORKERS", "FASTFAN_REDIS", "FASTFAN_API_HOST",
                     "FASTFAN_COMPRESSION", "FASTFAN_INSECURE", "FASTFAN_TLS_KEY"):
        assert f"[{variable}" in help_text
    assert "--compression on|off" in help_text
    assert "--log-format text|json" in help_text
    assert "redis+cluster://" in help_text and "shards" in help_text


@pytest.mark.parametrize("args, words", [
    (["--port", "http"], ["--port", "http"]),
    (["--port", "70000"], ["--port"]),
    (["--workers", "0"], ["--workers"]),
    (["--workers", "many"], ["--workers"]),
    (["--slow-consumer", "explode"], ["--slow-consumer", "explode"]),
    (["--max-buffer", "-1"], ["--max-buffer"]),
    (["--ping-interval", "0"], ["--ping-interval"]),
    (["--log-format", "xml"], ["--log-format"]),
    (["--echo-path", "echo"], ["--echo-path"]),
    (["--redis", "localhost:6379"], ["--redis"]),
    (["--redis", "redis://127.0.0.1:notaport"], ["--redis", "notaport", "port"]),
    (["--redis", "redis://a:6379,redis://b:port"], ["--redis", "redis://b:port"]),
    (["--redis", "redis://127.0.0.1/0?socket_timeout=x"], ["--redis", "socket_timeout"]),
    (["--compression", "yes"], ["--compression", "on or off"]),
    (["--compression-min-size", "-1"], ["--compression-min-size"]),
    (["--tls-cert", "cert.pem"], ["--tls-cert and --tls-key"]),
    (["--tls-cert", "no.pem", "--tls-key", "no.pem"], ["cannot load --tls-cert no.pem"]),
    (["--frobnicate"], ["--frobnicate"]),
])
@pytest.mark.slow
def test_bad_options_are_one_clear_line_and_exit_2(args: list[str], words: list[str]) -> None:
    assert_usage_error(fastfan("run", "--insecure", *args), *words)


def test_bad_environment_values_name_the_variable() -> None:
    result = fastfan("run", "--insecure", env={"FASTFAN_MAX_BUFFER": "lots"})
    assert_usage_error(result, "FASTFAN_MAX_BUFFER")


def test_no_command_is_a_usage_error() -> None:
    assert_usage_error(fastfan())


@pytest.mark.slow
def test_environment_configures_and_flags_win(start_server: Any) -> None:
    port = free_port()
    server = start_server("--max-message-size", "100", secret=None,
                          env={"FASTFAN_INSECURE": "true", "FASTFAN_MAX_MESSAGE_SIZE": "5000",
                               "FASTFAN_PORT": str(port)})
    client = RawClient(server.host, server.port, "/")  # --port given by the fixture wins
    assert client.recv_json()["data"]["user"] == "anonymous"
    client.send_frame(0x1, b'{"type":"ping","pad":"' + b"x" * 200 + b'"}')
    assert client.recv_close()[0] == 1009  # the flag's 100, not the environment's 5000


def test_token_command_mints_a_token_the_server_accepts() -> None:
    result = fastfan("token", "--sub", "alice", "--subscribe", "chat.*", "--subscribe", "news",
                     "--publish", "chat.*", "--ttl", "60", env={"FASTFAN_JWT_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["subscribe"] == ["chat.*", "news"]
    assert claims["publish"] == ["chat.*"]
    assert 55 <= claims["exp"] - claims["iat"] <= 60


def test_token_command_needs_a_secret() -> None:
    assert_usage_error(fastfan("token", "--sub", "alice"), "--jwt-secret")


def test_token_command_refuses_what_the_server_refuses() -> None:
    result = fastfan("token", "--sub", "", env={"FASTFAN_JWT_SECRET": SECRET})
    assert_usage_error(result, "--sub is empty")
    assert result.stderr.startswith("usage: fastfan token ")
    assert result.stdout == ""


@pytest.mark.parametrize("args, words", [
    (["--api", "http://127.0.0.1:1", "news", "hello"],
     ["'hello' is not JSON", "quote", "'\"hello\"'"]),
    (["--api", "127.0.0.1:9090", "news", "1"],
     ["--api 127.0.0.1:9090 needs its scheme", "http://127.0.0.1:9090"]),
])
def test_publish_says_what_to_write_instead(args: list[str], words: list[str]) -> None:
    result = fastfan("publish", "--api-key", "k", *args)
    assert_usage_error(result, *words)
    assert result.stderr.startswith("usage: fastfan publish ")


@pytest.mark.parametrize("command", [["run"], ["publish", "--api", "http://x", "c", "1"],
                                     ["token", "--sub", "alice"]])
def test_an_unknown_option_is_the_command_s_usage_error(command: list[str]) -> None:
    result = fastfan(*command, "--no-such-option")
    assert_usage_error(result, "unrecognized arguments: --no-such-option")
    assert result.stderr.startswith(f"usage: fastfan {command[0]} ")


def test_python_dash_m_and_the_script_are_the_same_program() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "fastfan")
    result = subprocess.run([script, "run", "--help"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0
    for option in ("--max-subscriptions", "--publish-rate", "--echo-path", "--shutdown-grace"):
        assert option in result.stdout


def test_compression_off_from_the_environment(start_server: Any) -> None:
    server = start_server(env={"FASTFAN_COMPRESSION": "off"})
    offer = {"Sec-WebSocket-Extensions": "permessage-deflate"}
    client = RawClient(server.host, server.port, "/?token=" + jwt.encode(
        {"sub": "alice"}, SECRET, algorithm="HS256"), headers=offer)
    assert "sec-websocket-extensions" not in client.headers
