"""Many connections: connect rate, server RSS per idle connection, delivery to all.

    ./dev bench --scenarios connections --connections 100000 --workers 6 --processes 6
"""

from __future__ import annotations

import time
from typing import Any

from lib import Subscribers, free_port, rss_bytes, run_loadgen, start_fastfan

from .common import NO_HEARTBEAT, stop


def connections(connections: int = 10_000, workers: int = 1, processes: int = 1,
                duration: float = 3.0) -> list[dict[str, Any]]:
    """Many connections: connect rate, server RSS per idle connection, delivery to all.

    Subscribers come from several load generator processes (a process holds at most
    ~20,000 sockets here), each from its own 127.0.0.x (one source address reaches one
    port with ~28,000). Once all are subscribed and idle, the server's RSS (master and
    workers) is compared with its RSS before they came; then one publisher sends 10
    messages/s for `duration` s to all of them.
    """
    port = free_port()
    server = start_fastfan(port, ["--workers", str(workers), *NO_HEARTBEAT], pin=False)
    share = connections // processes
    total = share * processes
    try:
        time.sleep(1)
        baseline = rss_bytes(server.pid)
        started = time.monotonic()
        with Subscribers([port] * processes, subs=share, channel="all", duration=duration,
                         drain=3, sources=[f"127.0.0.{2 + k}" for k in range(processes)]) as subs:
            subs.ready()
            connect_s = time.monotonic() - started
            time.sleep(1)
            loaded = rss_bytes(server.pid)
            subs.go()
            sent = run_loadgen(port, subs=0, rate=10, duration=duration, channel="all",
                               pin=False, extra=["--drain", "0"])["sent"]
            reports = subs.reports()
    finally:
        stop(server)
    delivered = sum(r["delivered"] for r in reports)
    row = {
        "scenario": "connections", "connections": total, "workers": workers,
        "processes": processes, "connect_s": round(connect_s, 2),
        "connects_per_s": round(total / connect_s),
        "rss_before_mb": round(baseline / 2**20, 1), "rss_loaded_mb": round(loaded / 2**20, 1),
        "rss_per_connection_kib": round((loaded - baseline) / total / 1024, 2),
        "sent": sent, "expected": sent * total, "delivered": delivered,
        "lost": sent * total - delivered,
        "p99_ms_worst_process": max(r["p99_ms"] for r in reports),
    }
    print(f"\nconnections: {row}", flush=True)
    return [row]
