"""Connect, subscribe, receive, disconnect, over and over: does memory come back?

    ./dev bench --scenarios churn                       # 100,000 connect-subscribe-leave cycles
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from lib import free_port, metrics, rss_bytes, start_fastfan, subscriber

from .common import NO_HEARTBEAT, stop


def _churn_cycles(port: int, first: int, count: int) -> None:
    """Connect, subscribe to a channel of its own, publish, receive it, leave; `count` times."""
    for n in range(first, first + count):
        client = subscriber(port, f"churn-{n}", timeout=10, source=f"127.0.0.{2 + n % 8}")
        client.send_json({"type": "publish", "channel": f"churn-{n}", "data": n})
        client.recv_json()
        client.close()


def _in_processes(port: int, start: int, total: int, processes: int) -> None:
    share = total // processes
    clients = [multiprocessing.Process(target=_churn_cycles, args=(port, start + k * share, share))
               for k in range(processes)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
        if client.exitcode:
            raise RuntimeError(f"a client process failed ({client.exitcode})")


def churn(cycles: int = 100_000, processes: int = 4) -> list[dict[str, Any]]:
    """Connect, subscribe, receive, disconnect, `cycles` times: does memory come back?

    The server's RSS after the first 10,000 cycles (or half, for fewer) and after all of
    them, and its channel, subscription and connection counts at the end (all should be
    0). Each cycle uses a channel of its own, so a channel table that forgot to drop
    entries would show. Sources rotate over 127.0.0.2-9: closed connections wait in
    TIME_WAIT for 60 s.
    """
    port = free_port()
    server = start_fastfan(port, NO_HEARTBEAT, pin=False)
    first = min(10_000, cycles // 2)
    try:
        started = time.monotonic()
        _in_processes(port, 0, first, processes)
        time.sleep(2)  # one heartbeat sweep: idle buffers released
        after_first = rss_bytes(server.pid)
        _in_processes(port, first, cycles - first, processes)
        time.sleep(2)
        after_all = rss_bytes(server.pid)
        figures = metrics(port)
        elapsed = time.monotonic() - started
    finally:
        stop(server)
    row = {
        "scenario": "churn", "cycles": cycles, "seconds": round(elapsed, 1),
        "cycles_per_s": round(cycles / elapsed), "first_cycles": first,
        "rss_after_first_mb": round(after_first / 2**20, 2),
        "rss_after_all_mb": round(after_all / 2**20, 2),
        "growth_kib": round((after_all - after_first) / 1024),
        "connections": figures["fastfan_connections"],
        "channels": figures["fastfan_channels"],
        "subscriptions": figures["fastfan_subscriptions"],
        "connections_total": figures["fastfan_connections_total"],
    }
    print(f"\nchurn: {row}", flush=True)
    return [row]
