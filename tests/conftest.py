"""The pytest fixtures: real fastfan, redis-server and Redis Cluster processes, always
stopped. What they are made of, and every other tool the tests share, is in support/.

(The names below from support/ are also importable from here, as `from conftest import
Server, token`, for the test files written before support/ was.)
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from support.processes import children, loadgen, process_holding, process_state
from support.redis import Cluster, RedisServer
from support.server import SECRET, Server, messages_of, token, worker_rss_kib
from support.tls import TlsServer, make_pki
from support.waiting import assert_received_by_all, wait_for
from support.wire import free_port
from support.workers import one_per_worker

__all__ = ["SECRET", "RedisServer", "Server", "assert_received_by_all", "children",
           "free_port", "loadgen", "messages_of", "one_per_worker", "process_holding",
           "process_state", "token", "wait_for", "worker_rss_kib"]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Any]:
    """start(*args, **kwargs) -> a Server (support.server.Server's arguments); each one
    killed at the end of the test."""
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


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One plain server for the tests of a module that each look only at their own
    connection (a parametrized test's many cases): one start, not one per test."""
    server = Server(tmp_path_factory.mktemp("shared") / "server.log")
    yield server
    server.stop()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A throwaway CA and a certificate it signed for 127.0.0.1 (support.tls.make_pki)."""
    return make_pki(tmp_path)


@pytest.fixture
def start_tls(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Any]:
    """start(*args) -> a TlsServer with `pki`'s certificate; each one stopped at the end."""
    servers: list[TlsServer] = []

    def start(*args: str) -> TlsServer:
        servers.append(TlsServer(tmp_path / f"tls-{len(servers)}.log", pki, *args))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis.log")
    yield server
    server.kill()


@pytest.fixture(scope="module")
def cluster_of_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One Redis Cluster for a test module: making one takes seconds."""
    made = Cluster(tmp_path_factory.mktemp("cluster"))
    yield made
    made.kill()


@pytest.fixture
def cluster(cluster_of_module: Cluster) -> Cluster:
    """The module's Redis Cluster, as good as new: every node up, every master flushed."""
    cluster_of_module.reset()
    return cluster_of_module


@pytest.fixture
def clients() -> Iterator[ExitStack]:
    """Closes every client a test entered into it."""
    with ExitStack() as stack:
        yield stack
