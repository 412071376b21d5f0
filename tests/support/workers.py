"""Clients placed on a server's workers: the kernel hands each new connection to whichever
worker it picks, so a test connects until every worker holds what it needs, telling which
one holds a connection from /proc."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from support.processes import process_holding
from support.server import Server
from support.wire import RawClient


def worker_of(server: Server, client: RawClient, workers: list[int] | None = None) -> int | None:
    """The pid of the worker (of `workers`, by default all of the server's) that holds
    `client`'s connection."""
    return process_holding(client.sock.getsockname()[1],
                           server.workers() if workers is None else workers)


def place(server: Server, per_worker: int = 1, sub: str = "alice", channels: tuple[str, ...] = (),
          *, options: dict[str, Any] | None = None, connect: Callable[[], RawClient] | None = None,
          workers: list[int] | None = None,
          spares: list[RawClient] | None = None) -> dict[int, list[RawClient]]:
    """Connections of `sub` (or made by `connect()`) until each of `workers` (by default all
    of the server's) holds `per_worker`: worker pid -> its connections, each subscribed
    once placed to `channels` (with `options`, e.g. joinLeave). A connection no worker
    needs is closed, or kept open in `spares` when given (its close would be an event)."""
    workers = server.workers() if workers is None else workers
    placed: dict[int, list[RawClient]] = {pid: [] for pid in workers}
    for _ in range(60 * len(workers)):
        if all(len(held) >= per_worker for held in placed.values()):
            return placed
        client = server.connect(sub) if connect is None else connect()
        pid = worker_of(server, client, workers)
        if pid is None or len(placed[pid]) >= per_worker:
            if spares is None:
                client.close()
            else:
                spares.append(client)
            continue
        for channel in channels:
            client.send_json({"type": "subscribe", "channel": channel, **(options or {})})
            answer = client.recv_json()
            assert answer == {"type": "subscribed", "channel": channel}, answer
        placed[pid].append(client)
    raise AssertionError(f"the kernel never put {per_worker} on every worker: {placed}")


def one_per_worker(server: Server, sub: str = "alice") -> dict[int, RawClient]:
    """A connection of `sub` held by each worker, keyed by worker pid."""
    placed = place(server, connect=lambda: server.connect(sub, timeout=2))
    return {pid: held for pid, (held,) in placed.items()}


def every(placed: dict[int, list[RawClient]]) -> list[RawClient]:
    return [client for held in placed.values() for client in held]


def apart(servers: list[Server], connect: Callable[[Server, str], RawClient], one: str,
          other: str) -> tuple[RawClient, RawClient]:
    """Clients `one` and `other` (made by `connect(server, user)`) held by different
    workers of the one server, or by different servers (nodes); one worker: both on it."""
    first = connect(servers[0], one)
    if len(servers) > 1:
        return first, connect(servers[1], other)
    server = servers[0]
    if len(server.workers()) == 1:
        return first, connect(server, other)
    held = worker_of(server, first)
    for _ in range(100):
        second = connect(server, other)
        if worker_of(server, second) != held:
            return first, second
        second.close()
    raise AssertionError("the kernel never put the second client on the other worker")
