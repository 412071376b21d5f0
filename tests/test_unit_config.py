"""Config's validation, one option at a time: what the CLI tests reach only a process each."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fastfan.config import Config, ConfigError, reload
from fastfan.namespaces import Namespace

# (the one option that differs from the defaults, words the error must hold)
REFUSED: list[tuple[dict[str, Any], list[str]]] = [
    ({"port": -1}, ["--port", "0-65535", "-1"]),
    ({"port": 65536}, ["--port", "65536"]),
    ({"workers": 0}, ["--workers", "0"]),
    *(({name: 0}, ["--" + name.replace("_", "-"), "positive integer"])
      for name in ("max_message_size", "max_subscriptions", "publish_rate", "max_buffer")),
    ({"max_connections": 0}, ["--max-connections"]),
    *(({name: value}, ["--" + name.replace("_", "-"), "seconds"])
      for name in ("ping_interval", "ping_timeout", "shutdown_grace", "stats_interval")
      for value in (0, -0.5)),
    ({"slow_consumer": "explode"}, ["--slow-consumer", "disconnect, drop, conflate",
                                    "'explode'"]),
    ({"log_level": "loud"}, ["--log-level", "debug"]),
    ({"log_format": "xml"}, ["--log-format", "json"]),
    ({"echo_path": "echo"}, ["--echo-path", "'/'", "'echo'"]),
    *(({"echo_path": path}, ["--echo-path", path, "already"])
      for path in ("/", "/ws", "/health", "/ready", "/metrics")),
    ({"redis": "localhost:6379"}, ["--redis", "redis://", "'localhost:6379'"]),
    ({"redis": "http://localhost"}, ["--redis"]),
    ({"redis": "redis://a:6379,b:6379"}, ["--redis", "several", "'b:6379'"]),
    ({"redis": "redis://a:6379,redis://a:6379"}, ["--redis", "twice"]),
    ({"redis": "redis+cluster://a:7000,b"}, ["--redis", "host:port", "'b'"]),
    ({"compression_min_size": -1}, ["--compression-min-size"]),
    ({"tls_cert": "cert.pem"}, ["--tls-cert and --tls-key go together"]),
    ({"tls_key": "key.pem"}, ["--tls-cert and --tls-key go together"]),
    ({"tls_cert": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem"},
     ["cannot load --tls-cert /nonexistent/cert.pem", "--tls-key /nonexistent/key.pem"]),
]

ACCEPTED: list[dict[str, Any]] = [
    {"port": 0}, {"port": 65535}, {"workers": 1}, {"max_buffer": 1}, {"max_connections": 1},
    {"max_connections": None}, {"ping_interval": 0.001}, {"slow_consumer": "drop"},
    {"slow_consumer": "conflate"}, {"log_level": "debug"}, {"log_format": "json"},
    {"echo_path": "/echo"}, {"redis": "redis://localhost:6379/0"},
    {"redis": "rediss://user:pw@example.com:6380/1"},
    {"redis": "redis://a:6379,rediss://b:6380/1"},
    {"redis": "redis+cluster://user:pw@a:7000,b:7001"},
    {"redis": "redis+cluster://a:7000", "history_size": 10},
    {"compression": False}, {"compression_min_size": 0},
]


@pytest.mark.parametrize("options, words", REFUSED, ids=[str(o) for o, _ in REFUSED])
def test_a_bad_value_is_refused_with_a_message_naming_it(options: dict[str, Any],
                                                         words: list[str]) -> None:
    with pytest.raises(ConfigError) as refused:
        Config(**options)
    message = str(refused.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("options", ACCEPTED, ids=str)
def test_values_at_the_edges_are_accepted(options: dict[str, Any]) -> None:
    config = Config(**options)
    for name, value in options.items():
        assert getattr(config, name) == value


def test_a_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


def test_run_needs_a_secret_or_insecure() -> None:
    with pytest.raises(ConfigError, match=r"--jwt-secret.*--insecure"):
        Config().require_auth_choice()
    Config(jwt_secret="s" * 32).require_auth_choice()
    Config(insecure=True).require_auth_choice()


def test_a_reload_applies_namespaces_unless_they_keep_more_history_than_at_start() -> None:
    running = Config(insecure=True, history_size=10,
                     namespaces=(Namespace(("chat.*",), history_size=5),))
    smaller = Config(insecure=True, history_size=10,
                     namespaces=(Namespace(("chat.*",), history_size=10, cache=True),))
    done = reload(running, smaller)
    assert (done.changed, done.need_restart) == (["namespaces"], [])
    assert done.config.namespaces == smaller.namespaces
    larger = Config(insecure=True, history_size=10,
                    namespaces=(Namespace(("chat.*",), history_size=11),))
    done = reload(running, larger)
    assert (done.changed, done.need_restart) == ([], ["namespaces"])
    assert done.config.namespaces == running.namespaces


def test_a_reload_applies_webhooks_only_if_they_were_on_and_stay_on() -> None:
    hooks = {"webhook_url": "http://127.0.0.1:1/a", "webhook_secret": "s"}
    on = Config(insecure=True, **hooks)
    moved = Config(insecure=True, **{**hooks, "webhook_url": "http://127.0.0.1:1/b"})
    assert reload(on, moved).changed == ["webhook_url"]
    off = Config(insecure=True)
    assert reload(off, on).need_restart == ["webhook_url", "webhook_secret"]
    assert reload(on, off).need_restart == ["webhook_url", "webhook_secret"]
