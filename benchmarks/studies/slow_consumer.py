"""Does one stalled client hurt the others, under each slow-consumer policy?

    ./dev bench --scenarios slow-consumer --policy drop
"""

from __future__ import annotations

from typing import Any

from lib import free_port, metrics, rss_bytes, run_loadgen, start_fastfan, subscriber

from .common import stop

SLOW_CONSUMER_COUNTERS = ("fastfan_slow_consumers_disconnected_total",
                          'fastfan_dropped_total{reason="slow_consumer"}',
                          'fastfan_dropped_total{reason="conflated"}')


def slow_consumer(policy: str = "disconnect", duration: float = 8.0) -> list[dict[str, Any]]:
    """Does one stalled client hurt the others? 1000 fast subscribers (the load
    generator) receive 8 KB messages at 100k deliveries/s with `--max-buffer` 1 MiB and
    the slow-consumer `policy`; in the second run one more subscriber, with the smallest
    receive window, never reads. The fast subscribers' rate, loss and p99, the server's
    RSS growth, and the policy's counters, for both runs."""
    rows = []
    print(f"\nslow-consumer, policy {policy}:")
    for stalled in (False, True):
        port = free_port()
        server = start_fastfan(port, ["--max-buffer", str(1 << 20), "--slow-consumer", policy])
        try:
            # held to the end of the run, never read from
            never_reads = subscriber(port, "stall", receive_buffer=4096) if stalled else None
            before = rss_bytes(server.pid)
            row = run_loadgen(port, subs=1000, rate=100, size=8000, duration=duration,
                              channel="stall")
            grown = (rss_bytes(server.pid) - before) / 2**20
            figures = metrics(port)
        finally:
            stop(server)
        if never_reads is not None:
            never_reads.close()
        counters = {name: figures.get(name, 0) for name in SLOW_CONSUMER_COUNTERS}
        rows.append({"scenario": "slow-consumer", "policy": policy, "stalled": stalled, **row,
                     "rss_growth_mb": round(grown, 1), **counters})
        print(f"{'one client stalled' if stalled else 'no client stalled'}: "
              f"delivered {row['delivered_per_s']:.0f}/s, lost {row['lost']}, "
              f"p99 {row['p99_ms']:.1f} ms, RSS +{grown:.1f} MB, {counters}", flush=True)
    return rows
