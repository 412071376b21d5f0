"""Fixtures that start real fastfan and redis-server processes and always stop them, and the
tools the tests share: tokens, a client that has its welcome, the processes' own figures.

A test file imports these by name (`from conftest import Server, token`); frames and RESP
made by hand are in wire.py.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as websocket_connect
from wire import RawClient, free_port, resp

from fastfan.auth import mint_token

SECRET = "test-secret-0123456789abcdef0123456789"
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def token(sub: str = "alice", *, secret: str = SECRET, **claims: Any) -> str:
    return mint_token(secret, sub, **claims)


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


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def start(*args: str, **kwargs: Any) -> Server:
        server = Server(tmp_path / f"server-{len(servers)}.log", *args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(signal.SIGKILL)


@pytest.fixture
def server(start_server: Any) -> Server:
    return start_server()


def messages_of(client: Any, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The next `count` JSON messages a websockets sync client receives."""
    return [json.loads(client.recv(timeout=timeout)) for _ in range(count)]


def process_state(pid: int) -> tuple[str, int]:
    """(state, parent pid) from /proc: state "Z" for a zombie, "gone" (parent 0) for none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "gone", 0
    return fields[0], int(fields[1])


def children(pid: int) -> list[int]:
    """The live child processes of `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state, parent = process_state(int(entry.name))
            if parent == pid and state not in ("Z", "gone"):
                found.append(int(entry.name))
    return sorted(found)


def process_holding(local_port: int, candidates: list[int]) -> int | None:
    """Which of `candidates` holds the server end of our connection from `local_port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == local_port:
                inodes.add(fields[9])
    for pid in candidates:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return pid
        except OSError:
            continue
    return None


def one_per_worker(server: Server, sub: str = "alice") -> dict[int, RawClient]:
    """A connection held by each of a two-worker server's workers, keyed by worker pid."""
    workers = children(server.process.pid)
    held: dict[int, RawClient] = {}
    spare = []
    for _ in range(100):
        client = server.connect(sub, timeout=2)
        pid = process_holding(client.sock.getsockname()[1], workers)
        if pid is not None and pid not in held:
            held[pid] = client
        else:
            spare.append(client)
        if len(held) == 2:
            break
    for client in spare:
        client.close()
    assert len(held) == 2, "the kernel never chose the second worker"
    return held


def assert_received_by_all(listeners: list[RawClient], acknowledged: set[int]) -> None:
    """Every listener receives every acknowledged publish (their `data`: numbers)."""
    for listener in listeners:
        received: set[int] = set()
        while not acknowledged <= received:
            try:
                received.add(listener.recv_json()["data"])
            except TimeoutError:
                break
        assert acknowledged - received == set()


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")


class RedisServer:
    """A real redis-server on `port` (a free one by default); `kill()` and `start()` again
    on the same port."""

    def __init__(self, log_path: Path, port: int | None = None, *options: str) -> None:
        self.port = free_port() if port is None else port
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_path
        self.options = options  # more redis-server options, e.g. --cluster-enabled yes
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--logfile", str(self.log_path),
             "--enable-debug-command", "local",  # DEBUG SLEEP plays a slow Redis
             *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, timeout=10)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(resp("PING"))
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str | bytes) -> bytes:
        """One command in RESP; the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(resp(*args))
            return sock.recv(65536)

    def subscribers(self, channel: str) -> int:
        """How many connections Redis has subscribed to a fastfan channel (default prefix)."""
        reply = self.command("PUBSUB", "NUMSUB", f"fastfan:{channel}")
        return int(reply.rsplit(b":", 1)[1].strip())

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis.log")
    yield server
    server.kill()


def worker_rss_kib(server: Server) -> int:
    """Resident memory of a one-worker server's worker."""
    (worker,) = children(server.process.pid)
    for line in Path(f"/proc/{worker}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def loadgen() -> Path:
    """The C load generator of benchmarks/, built if it is not already."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    from lib import build_loadgen

    return build_loadgen()
