"""Soak: steady fan-out for minutes while other subscribers keep joining and leaving.

    python benchmarks/soak.py --minutes 10

One server (CPU 0). Rounds of 20 s: the load generator (CPU 1) connects 1000 fresh
subscribers, publishes at 200k deliveries/s, checks loss and order, and leaves; meanwhile
a churn process connects, subscribes to the same channel, and disconnects, all the time.
Each round prints its loss, p99 and the server's RSS: all three should stay flat.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

from lib import free_port, rss_bytes, run_loadgen, start_fastfan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from wire import RawClient

ROUND_SECONDS = 20


def churn(port: int, channel: str, stop_at: float) -> None:
    n = 0
    while time.monotonic() < stop_at:
        client = RawClient("127.0.0.1", port, "/", timeout=10, source=f"127.0.0.{2 + n % 8}")
        client.recv_json()
        client.send_json({"type": "subscribe", "channel": channel})
        time.sleep(0.01)  # it may get a few messages before it leaves
        client.close()
        n += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    args = parser.parse_args()
    port = free_port()
    server = start_fastfan(port, [])
    stop_at = time.monotonic() + args.minutes * 60
    churner = multiprocessing.Process(target=churn, args=(port, "soak", stop_at + 60))
    churner.start()
    rows = []
    try:
        print(f"{'round':>5} {'lost':>6} {'p99 ms':>8} {'RSS MB':>8}")
        while time.monotonic() + ROUND_SECONDS < stop_at:
            row = run_loadgen(port, subs=1000, rate=200, duration=ROUND_SECONDS,
                              extra=["--channel", "soak"])
            rows.append((row["lost"], row["p99_ms"], rss_bytes(server.pid) / 2**20))
            print(f"{len(rows):>5} {rows[-1][0]:>6} {rows[-1][1]:>8.2f} {rows[-1][2]:>8.1f}",
                  flush=True)
    finally:
        churner.terminate()
        server.terminate()
        server.wait(30)
    lost = sum(r[0] for r in rows)
    p99s = [r[1] for r in rows]
    print(f"\n{len(rows)} rounds: lost {lost}, p99 {min(p99s):.1f}..{max(p99s):.1f} ms, "
          f"RSS {rows[0][2]:.1f} -> {rows[-1][2]:.1f} MB")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
