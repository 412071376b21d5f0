"""Many connections: connect rate, server RSS per idle connection, and delivery to all.

    python benchmarks/connections.py                                   # 10,000 on one worker
    python benchmarks/connections.py --connections 100000 --workers 6 --processes 6

Subscribers come from several load generator processes (a process holds at most ~20,000
sockets here), each from its own 127.0.0.x source address (one source address reaches one
port with ~28,000). Once all are subscribed and idle, the server's RSS (master and
workers) is compared with its RSS before they came; then one publisher sends to all.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lib import build_loadgen, free_port, server_pids, start_fastfan


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def server_rss(master: int) -> int:
    """RSS of the master and its workers."""
    return sum(rss_bytes(pid) for pid in server_pids(master))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--workers", default="1")
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--rate", type=float, default=10, help="publishes per second")
    parser.add_argument("--duration", type=float, default=3)
    args = parser.parse_args()

    loadgen = build_loadgen()
    port = free_port()
    server = start_fastfan(port, ["--workers", args.workers, "--ping-interval", "600",
                                  "--ping-timeout", "1200"], pin=False)
    time.sleep(1)
    baseline = server_rss(server.pid)
    share = args.connections // args.processes
    started = time.monotonic()
    subscribers = [
        subprocess.Popen(
            [str(loadgen), "--port", str(port), "--subs", str(share), "--rate", "0",
             "--sync", "1", "--sources", f"127.0.0.{2 + k}", "--channel", "all",
             "--duration", str(args.duration), "--drain", "3"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for k in range(args.processes)]
    try:
        for process in subscribers:
            assert process.stdout is not None
            ready = json.loads(process.stdout.readline())
            assert ready["ready"], ready
        connect_s = time.monotonic() - started
        time.sleep(1)
        loaded = server_rss(server.pid)
        total = share * args.processes
        for process in subscribers:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        publisher = subprocess.run(
            [str(loadgen), "--port", str(port), "--subs", "0", "--rate", str(args.rate),
             "--duration", str(args.duration), "--channel", "all", "--drain", "0"],
            capture_output=True, text=True, check=True)
        sent = json.loads(publisher.stdout)["sent"]
        reports = [json.loads(p.communicate(timeout=120)[0]) for p in subscribers]
    finally:
        for process in subscribers:
            process.kill()
        server.terminate()
        server.wait(60)
    delivered = sum(r["delivered"] for r in reports)
    result = {
        "connections": total, "workers": args.workers, "processes": args.processes,
        "connect_s": round(connect_s, 2), "connects_per_s": round(total / connect_s),
        "rss_before_mb": round(baseline / 2**20, 1), "rss_loaded_mb": round(loaded / 2**20, 1),
        "rss_per_connection_kib": round((loaded - baseline) / total / 1024, 2),
        "sent": sent, "expected": sent * total, "delivered": delivered,
        "lost": sent * total - delivered,
        "p99_ms_worst_process": max(r["p99_ms"] for r in reports),
    }
    print(json.dumps(result, indent=2))
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
