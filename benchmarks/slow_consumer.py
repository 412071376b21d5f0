"""Does one stalled client hurt the others? Fan-out with and without a client that stops
reading, under a slow-consumer policy.

    python benchmarks/slow_consumer.py --policy drop

1000 fast subscribers (the load generator) receive 8 KB messages at 100k deliveries/s;
in the second run one more subscriber, with the smallest receive window, never reads.
Prints the fast subscribers' delivered rate, loss and p99, the server's RSS growth, and
the policy's counters, for both runs.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path

from lib import free_port, rss_bytes, run_loadgen, start_fastfan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from wire import RawClient

COUNTERS = ("fastfan_slow_consumers_disconnected_total",
            'fastfan_dropped_total{reason="slow_consumer"}',
            'fastfan_dropped_total{reason="conflated"}')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="disconnect",
                        choices=("disconnect", "drop", "conflate"))
    args = parser.parse_args()
    for stalled in (False, True):
        port = free_port()
        server = start_fastfan(port, ["--max-buffer", str(1 << 20),
                                      "--slow-consumer", args.policy])
        try:
            if stalled:
                slow = RawClient("127.0.0.1", port, "/", receive_buffer=4096)
                slow.recv_json()
                slow.send_json({"type": "subscribe", "channel": "stall"})
                slow.recv_json()
            before = rss_bytes(server.pid)
            row = run_loadgen(port, subs=1000, rate=100, size=8000, duration=8,
                              extra=["--channel", "stall"])
            grown = (rss_bytes(server.pid) - before) / 2**20
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            counters = {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1]
                        for line in text.splitlines() if line.startswith(COUNTERS)}
        finally:
            server.terminate()
            server.wait()
        print(f"{args.policy}, {'one client stalled' if stalled else 'no client stalled'}: "
              f"delivered {row['delivered_per_s']:.0f}/s, lost {row['lost']}, "
              f"p99 {row['p99_ms']:.1f} ms, RSS +{grown:.1f} MB, {counters}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
