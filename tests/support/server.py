"""A `fastfan run` process and what a test does with it: tokens, clients with their
welcome read, its HTTP endpoints, its workers, killing and restarting it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as websocket_connect

from fastfan.auth import mint_token
from support.processes import children, memory_kib
from support.waiting import wait_for
from support.wire import RawClient, free_port

SECRET = "test-secret-0123456789abcdef0123456789"


def token(sub: str = "alice", *, secret: str = SECRET, **claims: Any) -> str:
    return mint_token(secret, sub, **claims)


def messages_of(client: Any, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The next `count` JSON messages a websockets sync client receives."""
    return [json.loads(client.recv(timeout=timeout)) for _ in range(count)]


class Server:
    """A `fastfan run` process on a free port of 127.0.0.1."""

    def __init__(self, log_path: Path, *args: str, env: dict[str, str] | None = None,
                 secret: str | None = SECRET, host: str = "127.0.0.1",
                 wrapper: tuple[str, ...] = ()) -> None:
        self.host = host
        self.port = free_port()
        self.log_path = log_path
        command = [*wrapper, sys.executable, "-m", "fastfan", "run", "--host", self.host,
                   "--port", str(self.port), *args]
        if secret is not None:
            command += ["--jwt-secret", secret]
        self._log = open(log_path, "wb")  # noqa: SIM115 - open for the process's life
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}:\n{self.log()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not healthy in {timeout}s:\n{self.log()}")

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until /ready answers 200: with --redis, once every worker has reached Redis."""
        wait_for(lambda: self.get("/ready")[0] == 200, timeout)

    def url(self, path: str = "/", token: str | None = None) -> str:
        query = f"?token={token}" if token else ""
        return f"ws://{self.host}:{self.port}{path}{query}"

    def connect(self, sub: str = "alice", *, path: str = "/", timeout: float = 5.0,
                **options: Any) -> RawClient:
        """A RawClient with a token for `sub` in the query string, its welcome read.

        `options` go to RawClient: headers, receive_buffer, source.
        """
        client = RawClient(self.host, self.port, f"{path}?token={token(sub)}", timeout=timeout,
                           **options)
        assert client.recv_json()["type"] == "welcome"
        return client

    @contextmanager
    def websocket(self, sub: str = "alice", **claims: Any) -> Iterator[ClientConnection]:
        """A `websockets` client with a token for `sub` (and `claims`) in the Authorization
        header, its welcome read."""
        headers = {"Authorization": f"Bearer {token(sub, **claims)}"}
        with websocket_connect(self.url(), additional_headers=headers, open_timeout=5) as ws:
            assert messages_of(ws)[0]["type"] == "welcome"
            yield ws

    def http_connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=5)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str],
                                                                             bytes]:
        conn = self.http_connection()
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        status, _, body = self.get("/metrics")
        assert status == 200
        figures = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                figures[name] = float(value)
        return figures

    def workers(self) -> list[int]:
        """Its workers' pids, sorted."""
        return children(self.process.pid)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def worker_rss_kib(server: Server) -> int:
    """Resident memory of a one-worker server's worker."""
    (worker,) = server.workers()
    return memory_kib(worker, "VmRSS")


def kill(server: Server) -> None:
    """SIGKILL the master and its workers."""
    for pid in [*server.workers(), server.process.pid]:
        os.kill(pid, signal.SIGKILL)
    server.process.wait()


def restart(server: Server) -> None:
    """The same command again, on the same port."""
    server.process = subprocess.Popen(server.process.args, stdout=server._log,
                                      stderr=subprocess.STDOUT)
    server.wait_healthy()


def kill_and_restart(server: Server) -> None:
    kill(server)
    restart(server)
