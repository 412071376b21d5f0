"""The Redis path against the embedded bus: same subscribers, same open-loop publisher.

    python benchmarks/redis_path.py --subs 1000 --rates 50000,200000,500000
    (also the suite's `redis` scenario: ./dev bench --scenarios redis)

redis:    two nodes sharing one redis-server, half the subscribers on each node, the
          publisher on the first: every message crosses Redis. fastfan (--redis), the
          seed's design (Node ws + ioredis, as the article writes it), and Socket.IO with
          its Redis adapter (peers/socketio.js).
embedded: one fastfan with --workers 2 and no Redis; subscribers spread over both workers
          by the kernel, every message crosses the embedded bus to the other worker.

Nothing is pinned here: two nodes, Redis and the load generators share both cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lib import (
    HEADER,
    PEERS,
    build_loadgen,
    format_row,
    free_port,
    protocol_args,
    start_fastfan,
    wait_listening,
)


def start_redis(port: int, workdir: str) -> subprocess.Popen[bytes]:
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", workdir],
                             stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    return redis


def run(loadgen: Path, ports: list[int], subs: int, offered: float, duration: float,
        channel: str, protocol: list[str]) -> dict[str, Any]:
    """Subscribers split over `ports`, one publisher on the first; one summary row."""
    share = subs // len(ports)
    subscribers = [
        subprocess.Popen([str(loadgen), "--port", str(port), "--subs", str(share), "--rate", "0",
                          "--sync", "1", "--channel", channel, "--duration", str(duration),
                          "--drain", "2", *protocol], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        for port in ports]
    for process in subscribers:
        assert process.stdout is not None
        json.loads(process.stdout.readline())
    time.sleep(0.5)  # let every node's SUBSCRIBE reach Redis
    for process in subscribers:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    rate = offered / (share * len(ports))
    publisher = subprocess.run(
        [str(loadgen), "--port", str(ports[0]), "--subs", "0", "--rate", str(rate),
         "--duration", str(duration), "--channel", channel, "--drain", "0", *protocol],
        capture_output=True, text=True, check=True)
    sent = json.loads(publisher.stdout)["sent"]
    reports = [json.loads(p.communicate(timeout=duration + 60)[0]) for p in subscribers]
    delivered = sum(r["delivered"] for r in reports)
    return {
        "offered_per_s": offered, "sent": sent,
        "delivered_per_s": sum(r["delivered_per_s"] for r in reports),
        "lost": sent * share * len(ports) - delivered,
        "p50_ms": max(r["p50_ms"] for r in reports), "p99_ms": max(r["p99_ms"] for r in reports),
        "p999_ms": max(r["p999_ms"] for r in reports), "max_ms": max(r["max_ms"] for r in reports),
    }


def start_node(server: str, port: int, redis_port: int) -> subprocess.Popen[bytes]:
    """One node of `server` on `port`, publishing and subscribing through Redis."""
    if server == "fastfan":
        return start_fastfan(port, ["--publish-rate", "100000000", "--redis",
                                    f"redis://127.0.0.1:{redis_port}/0"], pin=False)
    script = {"seed": "seed.js", "socketio": "socketio.js"}[server]
    node = subprocess.Popen(["node", str(PEERS / script), str(port), str(redis_port)])
    wait_listening(port, node)
    return node


def through_redis(server: str, loadgen: Path, subs: int, rates: list[float],
                  duration: float) -> list[dict[str, Any]]:
    """Two nodes of `server` sharing one redis-server; half the subscribers on each."""
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        redis_port = free_port()
        redis = start_redis(redis_port, workdir)
        nodes = [free_port(), free_port()]
        processes = [start_node(server, port, redis_port) for port in nodes]
        try:
            print(f"\n{server} through Redis: two nodes, {subs} subscribers split over them"
                  f"\n{HEADER}")
            for n, offered in enumerate(rates):
                row = run(loadgen, nodes, subs, offered, duration, f"r{n}",
                          protocol_args(server))
                rows.append({"server": f"{server}+redis", "scenario": "redis", **row})
                print(format_row(row), flush=True)
                if row["delivered_per_s"] < offered / 2:
                    break  # saturated: higher rates say nothing more
        finally:
            for process in processes:
                process.terminate()
                process.wait(30)
            redis.terminate()
            redis.wait(10)
    return rows


def embedded(loadgen: Path, subs: int, rates: list[float],
             duration: float) -> list[dict[str, Any]]:
    """One fastfan with --workers 2 and no Redis: the embedded bus between the workers."""
    rows = []
    port = free_port()
    server = start_fastfan(port, ["--publish-rate", "100000000", "--workers", "2"], pin=False)
    try:
        print(f"\nfastfan embedded: one node, --workers 2, {subs} subscribers\n{HEADER}")
        for n, offered in enumerate(rates):
            row = run(loadgen, [port, port], subs, offered, duration, f"e{n}", [])
            rows.append({"server": "fastfan-2w", "scenario": "redis", **row})
            print(format_row(row), flush=True)
    finally:
        server.terminate()
        server.wait(30)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subs", type=int, default=1000)
    parser.add_argument("--rates", default="50000,200000,500000")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--servers", default="fastfan,seed,socketio")
    args = parser.parse_args()
    loadgen = build_loadgen()
    rates = [float(r) for r in args.rates.split(",")]
    for server in args.servers.split(","):
        through_redis(server, loadgen, args.subs, rates, args.duration)
    embedded(loadgen, args.subs, rates, args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
