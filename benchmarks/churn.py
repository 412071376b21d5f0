"""Churn: connect, subscribe, receive, disconnect, 100,000 times; does memory come back?

    python benchmarks/churn.py                      # 100,000 cycles, 4 client processes
    python benchmarks/churn.py --cycles 20000

Prints the server's RSS after the first 10,000 cycles and after all of them, and its
channel, subscription and connection counts at the end (all should be 0). Each cycle
uses a channel of its own, so a channel table that forgot to drop entries would show.
Sources rotate over 127.0.0.2-9: closed connections wait in TIME_WAIT for 60 s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
import urllib.request
from pathlib import Path

from lib import free_port, rss_bytes, start_fastfan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from wire import RawClient


def cycles(port: int, first: int, count: int) -> None:
    for n in range(first, first + count):
        client = RawClient("127.0.0.1", port, "/", timeout=10, source=f"127.0.0.{2 + n % 8}")
        client.recv_json()
        client.send_json({"type": "subscribe", "channel": f"churn-{n}"})
        client.recv_json()
        client.send_json({"type": "publish", "channel": f"churn-{n}", "data": n})
        client.recv_json()
        client.close()


def run(port: int, start: int, total: int, processes: int) -> None:
    share = total // processes
    workers = [multiprocessing.Process(target=cycles, args=(port, start + k * share, share))
               for k in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        if worker.exitcode:
            raise RuntimeError(f"a client process failed ({worker.exitcode})")


def metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    port = free_port()
    server = start_fastfan(port, ["--ping-interval", "600", "--ping-timeout", "1200"],
                           pin=False)
    try:
        started = time.monotonic()
        run(port, 0, 10_000, args.processes)
        time.sleep(2)  # one heartbeat sweep: idle buffers released
        after_first = rss_bytes(server.pid)
        run(port, 10_000, args.cycles - 10_000, args.processes)
        time.sleep(2)
        after_all = rss_bytes(server.pid)
        figures = metrics(port)
        elapsed = time.monotonic() - started
    finally:
        server.terminate()
        server.wait(30)
    print(json.dumps({
        "cycles": args.cycles, "seconds": round(elapsed, 1),
        "cycles_per_s": round(args.cycles / elapsed),
        "rss_after_10000_mb": round(after_first / 2**20, 2),
        "rss_after_all_mb": round(after_all / 2**20, 2),
        "growth_kib": round((after_all - after_first) / 1024),
        "connections": figures["fastfan_connections"],
        "channels": figures["fastfan_channels"],
        "subscriptions": figures["fastfan_subscriptions"],
        "connections_total": figures["fastfan_connections_total"],
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
