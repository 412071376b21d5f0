"""Reload (SIGHUP, `fastfan reload`): the config file read again and applied on every
worker without dropping a connection; a file that does not hold changes nothing."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from support.api import call
from support.server import SECRET, Server, token
from support.waiting import wait_for
from support.wire import HandshakeRefusedError, RawClient, free_port
from support.workers import every, place

NEW_SECRET = "the-rotated-secret-0123456789abcdef0123"
KEY, NEW_KEY = "api-key-before-0123456789", "api-key-after-0123456789"


def config_text(secret: str, api_key: str, api_port: int, **options: Any) -> str:
    lines = [f'jwt_secret = "{secret}"', f'api_key = "{api_key}"', f"api_port = {api_port}",
             "workers = 2", *(f"{key} = {value}" for key, value in options.items())]
    return "\n".join(lines) + "\n"


def reload(server: Server, pid_file: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "fastfan", "reload", "--pid-file",
                             str(pid_file)], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    assert f"sent SIGHUP to fastfan (pid {server.process.pid})" in result.stdout


def refused_with(server: Server, secret: str) -> int | None:
    """The status an upgrade with a token signed by `secret` gets (None: it is let in)."""
    try:
        RawClient(server.host, server.port, f"/?token={token(secret=secret)}").close()
    except HandshakeRefusedError as exc:
        return exc.status
    return None


@contextmanager
def publishing(server: Server, channel: str) -> Iterator[list[int]]:
    """A client publishing 0, 1, 2, ... to `channel` until the block ends; the numbers sent."""
    publisher = server.connect("publisher")
    sent: list[int] = []
    stop = threading.Event()

    def publish() -> None:
        while not stop.wait(0.002):
            publisher.publish(channel, len(sent))
            sent.append(len(sent))

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        yield sent
    finally:
        stop.set()
        thread.join()


@pytest.mark.slow
def test_a_reload_rotates_the_secret_and_key_under_load_dropping_nobody(
        tmp_path: Path, start_server: Any) -> None:
    config, pid_file, api_port = tmp_path / "fastfan.toml", tmp_path / "fastfan.pid", free_port()
    config.write_text(config_text(SECRET, KEY, api_port, max_subscriptions=3))
    server = start_server("--config", str(config), "--pid-file", str(pid_file), secret=None)
    wait_for(lambda: call(api_port, "info", headers={"Authorization": f"apikey {KEY}"})[0]
             == 200)
    subscribers = every(place(server, 3, channels=("feed",)))
    with publishing(server, "feed") as sent:
        wait_for(lambda: len(sent) > 50)
        config.write_text(config_text(NEW_SECRET, NEW_KEY, api_port, max_subscriptions=2,
                                      slow_consumer='"drop"'))
        reload(server, pid_file)
        # New connections need the new secret, on every worker.
        wait_for(lambda: server.log().count("reloaded") == 2)
        assert all(refused_with(server, SECRET) == 401 for _ in range(16))
        assert len(place(server, connect=lambda: _connect(server, NEW_SECRET))) == 2
        published = len(sent)
        wait_for(lambda: len(sent) > published + 50)  # and publishing goes on
    last = sent[-1]
    for subscriber in subscribers:  # every one still open, nothing missed
        assert [subscriber.recv_json()["data"] for _ in range(last + 1)] == list(range(last + 1))
    # The limits apply to open connections too: 2 subscriptions now, not 3.
    subscribers[0].subscribe("second")
    subscribers[0].send_json({"type": "subscribe", "channel": "third"})
    assert subscribers[0].recv_json()["code"] == 429
    assert call(api_port, "info", headers={"Authorization": f"apikey {KEY}"})[0] == 401
    assert call(api_port, "info", headers={"Authorization": f"apikey {NEW_KEY}"})[0] == 200
    log = server.log()
    assert "reload: jwt_secret, max_subscriptions, api_key" in log
    assert "reload: slow_consumer changed in the file; a restart applies it" in log
    assert NEW_SECRET not in log and NEW_KEY not in log


def _connect(server: Server, secret: str) -> RawClient:
    client = RawClient(server.host, server.port, f"/?token={token(secret=secret)}")
    assert client.recv_json()["type"] == "welcome"
    return client


def test_a_file_that_does_not_check_changes_nothing(tmp_path: Path, start_server: Any) -> None:
    config, pid_file = tmp_path / "fastfan.toml", tmp_path / "fastfan.pid"
    config.write_text(f'jwt_secret = "{SECRET}"\n')
    server = start_server("--config", str(config), "--pid-file", str(pid_file), secret=None)
    client = server.connect()
    config.write_text(f'jwt_secret = "{NEW_SECRET}"\nmax_bufer = 5\n')
    reload(server, pid_file)
    wait_for(lambda: "reload refused" in server.log())
    assert "reload refused, nothing changed: " in server.log()
    assert f"{config}:2: max_bufer: unknown key" in server.log()
    assert refused_with(server, SECRET) is None  # the old secret still lets clients in
    assert refused_with(server, NEW_SECRET) == 401
    client.subscribe("still-here")


def test_reload_without_a_running_master_says_so(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "fastfan", "reload", "--pid-file",
                             str(tmp_path / "absent.pid")], capture_output=True, text=True,
                            timeout=10)
    assert result.returncode == 1
    assert "cannot send SIGHUP to the master of" in result.stderr
    assert "No such file" in result.stderr
