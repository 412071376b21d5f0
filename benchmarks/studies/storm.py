"""A reconnect storm: many clients connecting at the same moment, as after a restart.

    ./dev bench --scenarios storm --connections 10000 --processes 20
"""

from __future__ import annotations

import time
from typing import Any

from lib import Subscribers, free_port, start_fastfan

from .common import stop


def storm(connections: int = 10_000, processes: int = 20, workers: int = 1) -> list[dict[str, Any]]:
    """A reconnect storm: `connections` clients connecting at the same moment, as after a
    restart, from `processes` load generators started at once. How long until every one
    was welcomed and subscribed."""
    port = free_port()
    server = start_fastfan(port, ["--workers", str(workers)], pin=False)
    share = connections // processes
    try:
        started = time.monotonic()
        with Subscribers([port] * processes, subs=share, channel="storm",
                         sources=[f"127.0.0.{2 + k % 200}" for k in range(processes)]) as subs:
            subs.ready()
            elapsed = time.monotonic() - started
            subs.go()
            subs.reports(timeout=60)
    finally:
        stop(server)
    total = share * processes
    row = {"scenario": "storm", "clients": total, "processes": processes, "workers": workers,
           "all_served_s": round(elapsed, 2), "connects_per_s": round(total / elapsed)}
    print(f"\nstorm: {row}", flush=True)
    return [row]
