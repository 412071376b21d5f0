"""Steady fan-out for minutes while other subscribers keep joining and leaving.

    ./dev bench --scenarios soak --minutes 10
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from lib import free_port, rss_bytes, run_loadgen, start_fastfan, subscriber

from .common import stop


def _join_and_leave(port: int, channel: str, stop_at: float) -> None:
    n = 0
    while time.monotonic() < stop_at:
        client = subscriber(port, channel, timeout=10, source=f"127.0.0.{2 + n % 8}")
        time.sleep(0.01)  # it may get a few messages before it leaves
        client.close()
        n += 1


def soak(minutes: float = 10.0) -> list[dict[str, Any]]:
    """Steady fan-out for minutes while other subscribers keep joining and leaving.

    One server (CPU 0). Rounds of 20 s (shorter when `minutes` is small): the load
    generator (CPU 1) connects 1000 fresh subscribers, publishes at 200k deliveries/s,
    checks loss and order, and leaves; meanwhile a process connects, subscribes to the
    same channel and disconnects, all the time. Loss, p99 and the server's RSS per round
    should all stay flat.
    """
    total = minutes * 60
    round_seconds = min(20.0, total / 2)
    port = free_port()
    server = start_fastfan(port, [])
    stop_at = time.monotonic() + total
    churner = multiprocessing.Process(target=_join_and_leave, args=(port, "soak", stop_at + 60))
    churner.start()
    rows: list[dict[str, Any]] = []
    try:
        print(f"\nsoak: rounds of {round_seconds:g} s\n{'round':>5} {'lost':>6} {'p99 ms':>8} "
              f"{'RSS MB':>8}")
        while time.monotonic() + round_seconds < stop_at:
            row = run_loadgen(port, subs=1000, rate=200, duration=round_seconds, channel="soak")
            rows.append({"scenario": "soak", "round": len(rows) + 1, **row,
                         "rss_mib": round(rss_bytes(server.pid) / 2**20, 1)})
            print(f"{len(rows):>5} {row['lost']:>6} {row['p99_ms']:>8.2f} "
                  f"{rows[-1]['rss_mib']:>8.1f}", flush=True)
    finally:
        churner.terminate()
        stop(server)
    p99s = [r["p99_ms"] for r in rows]
    print(f"{len(rows)} rounds: lost {sum(r['lost'] for r in rows)}, p99 {min(p99s):.1f}.."
          f"{max(p99s):.1f} ms, RSS {rows[0]['rss_mib']:.1f} -> {rows[-1]['rss_mib']:.1f} MB")
    return rows
