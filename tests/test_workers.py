"""Several workers: one port, cross-worker delivery, restarts, shutdown, orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

import pytest
from support.processes import children, loadgen, process_state
from support.server import token
from support.waiting import wait_for
from support.wire import CLOSE, RawClient
from support.workers import every, place, worker_of


def received(client: RawClient, count: int) -> list[Any]:
    return [client.recv_json()["data"] for _ in range(count)]


@pytest.mark.slow
def test_connections_spread_and_messages_cross_workers(start_server: Any) -> None:
    server = start_server("--workers", "3")
    assert len(children(server.process.pid)) == 3
    placed = place(server, 2, channels=("cross",))
    publisher = server.connect()
    for i in range(300):
        publisher.publish("cross", i)
    for clients in placed.values():
        for client in clients:
            assert received(client, 300) == list(range(300))
    # Each worker shares its figures at least once a second; any worker answers for all.
    connections = sum(map(len, placed.values())) + 1
    wait_for(lambda: (m := server.metrics())["fastfan_connections"] == connections
             and m["fastfan_deliveries_total"] == 300 * (connections - 1))


@pytest.mark.slow
def test_kill_9_of_a_worker_leaves_the_others_serving(start_server: Any) -> None:
    server = start_server("--workers", "3")
    placed = place(server, 2, channels=("live",))
    publisher = server.connect()
    publisher_pid = worker_of(server, publisher, list(placed))
    victim = next(pid for pid in placed if pid != publisher_pid)
    for i in range(200):
        publisher.publish("live", i)
        if i == 100:
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.002)
    for pid, clients in placed.items():
        for client in clients:
            if pid == victim:
                with pytest.raises((ConnectionError, OSError)):
                    received(client, 200)
            else:
                assert received(client, 200) == list(range(200))

    replacement = wait_for(lambda: next(
        (p for p in children(server.process.pid) if p not in placed), None))
    assert len(children(server.process.pid)) == 3
    assert wait_for(lambda: server.metrics()["fastfan_worker_restarts_total"] == 1)
    # The replacement joins the bus: its new subscribers hear the old publisher.
    (newcomer,) = every(place(server, channels=("live",), workers=[replacement]))
    publisher.publish("live", "after")
    assert newcomer.recv_json()["data"] == "after"


@pytest.mark.slow
def test_a_worker_that_keeps_dying_is_restarted_with_growing_backoff(start_server: Any) -> None:
    server = start_server("--workers", "1")
    gaps = []
    for _ in range(5):
        (worker,) = children(server.process.pid)
        killed = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda dead=worker: [p for p in children(server.process.pid) if p != dead],
                 15, 0.01)
        gaps.append(time.monotonic() - killed)
    assert gaps[0] < 0.5
    assert gaps[-1] >= 0.6 > gaps[1]  # 0.8 s after the fifth quick death, 0.1 s after the second
    assert "restarting in 0.8 s" in server.log()
    server.wait_healthy()


@pytest.mark.slow
def test_sigterm_closes_clients_on_every_worker_and_the_master_exits_last(
        start_server: Any) -> None:
    server = start_server("--workers", "2")
    workers = children(server.process.pid)
    placed = place(server, 2, channels=("bye",))
    server.process.send_signal(signal.SIGTERM)
    for clients in placed.values():
        for client in clients:
            assert client.recv_close() == (1001, "Server shutting down")
    assert server.process.wait(15) == 0
    assert all(process_state(pid)[0] in ("gone", "Z") for pid in workers)


def test_workers_exit_when_the_master_is_killed(start_server: Any) -> None:
    server = start_server("--workers", "2")
    workers = children(server.process.pid)
    client = server.connect().subscribe("orphan")
    server.process.kill()
    server.process.wait()
    assert client.recv_close() == (1001, "Server shutting down")
    client.send_frame(CLOSE, b"\x03\xe9")
    wait_for(lambda: all(process_state(pid)[0] in ("gone", "Z") for pid in workers), timeout=5)


@pytest.mark.slow
def test_many_connections_over_several_workers(start_server: Any) -> None:
    """A bounded run: 4,000 subscribers from the C load generator, two workers, no loss."""
    server = start_server("--workers", "2", "--publish-rate", "100000")
    result = subprocess.run(
        [str(loadgen()), "--port", str(server.port), "--path", f"/?token={token()}",
         "--subs", "4000", "--rate", "50", "--duration", "2", "--channel", "crowd",
         "--sources", "127.0.0.2,127.0.0.3"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sent"] >= 90
    assert report["lost"] == 0 and report["reordered"] == 0
    assert report["delivered"] == report["sent"] * 4000
