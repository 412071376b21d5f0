"""The redis scenario: the Redis path (fastfan, the seed, Socket.IO) against the embedded bus.

    ./dev bench --scenarios redis --rates 50000,200000,500000 --duration 4
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from typing import Any

from lib import (
    HEADER,
    PEERS,
    Subscribers,
    format_row,
    free_port,
    protocol_args,
    run_loadgen,
    start_fastfan,
    wait_listening,
)

from .common import start_redis, stop

REDIS_SERVERS = ("fastfan", "seed", "socketio")  # the servers with a Redis form


def _split_run(ports: list[int], subs: int, offered: float, duration: float, channel: str,
               protocol: list[str]) -> dict[str, Any]:
    """Subscribers split over `ports`, one publisher on the first; one summary row."""
    share = subs // len(ports)
    with Subscribers(ports, subs=share, channel=channel, duration=duration, drain=2,
                     extra=protocol) as subscribers:
        subscribers.ready()
        time.sleep(0.5)  # let every node's SUBSCRIBE reach Redis
        subscribers.go()
        sent = run_loadgen(ports[0], subs=0, rate=offered / (share * len(ports)),
                           duration=duration, channel=channel, pin=False,
                           extra=["--drain", "0", *protocol])["sent"]
        reports = subscribers.reports(timeout=duration + 60)
    delivered = sum(r["delivered"] for r in reports)
    return {
        "offered_per_s": offered, "sent": sent,
        "delivered_per_s": sum(r["delivered_per_s"] for r in reports),
        "lost": sent * share * len(ports) - delivered,
        **{key: max(r[key] for r in reports) for key in ("p50_ms", "p99_ms", "p999_ms", "max_ms")},
    }


def _start_node(server: str, port: int, redis_port: int) -> subprocess.Popen[bytes]:
    """One node of `server` on `port`, publishing and subscribing through Redis."""
    if server == "fastfan":
        return start_fastfan(port, ["--redis", f"redis://127.0.0.1:{redis_port}/0"], pin=False)
    script = {"seed": "seed.js", "socketio": "socketio.js"}[server]
    node = subprocess.Popen(["node", str(PEERS / script), str(port), str(redis_port)])
    wait_listening(port, node)
    return node


def _through_redis(server: str, subs: int, rates: list[float],
                   duration: float) -> list[dict[str, Any]]:
    """Two nodes of `server` sharing one redis-server; half the subscribers on each."""
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        redis_port = free_port()
        redis_server = start_redis(redis_port, workdir)
        nodes = [free_port(), free_port()]
        processes = [_start_node(server, port, redis_port) for port in nodes]
        try:
            print(f"\n{server} through Redis: two nodes, {subs} subscribers split over them"
                  f"\n{HEADER}")
            for n, offered in enumerate(rates):
                row = _split_run(nodes, subs, offered, duration, f"r{n}", protocol_args(server))
                rows.append({"server": f"{server}+redis", "scenario": "redis", **row})
                print(format_row(row), flush=True)
                if row["delivered_per_s"] < offered / 2:
                    break  # saturated: higher rates say nothing more
        finally:
            for process in processes:
                stop(process)
            redis_server.terminate()
            redis_server.wait(10)
    return rows


def _embedded(subs: int, rates: list[float], duration: float) -> list[dict[str, Any]]:
    """One fastfan with --workers 2 and no Redis: the embedded bus between the workers."""
    rows = []
    port = free_port()
    server = start_fastfan(port, ["--workers", "2"], pin=False)
    try:
        print(f"\nfastfan embedded: one node, --workers 2, {subs} subscribers\n{HEADER}")
        for n, offered in enumerate(rates):
            row = _split_run([port, port], subs, offered, duration, f"e{n}", [])
            rows.append({"server": "fastfan-2w", "scenario": "redis", **row})
            print(format_row(row), flush=True)
    finally:
        stop(server)
    return rows


def redis(servers: list[str], rates: list[float], duration: float,
          subs: int = 1000) -> list[dict[str, Any]]:
    """The Redis path against the embedded bus, same subscribers, same open-loop publisher.

    Through Redis: two nodes sharing one redis-server, half the subscribers on each, the
    publisher on the first, so every message crosses Redis: fastfan (--redis), the seed's
    design (Node ws + ioredis, as the article has it) and Socket.IO with its Redis adapter,
    those of them in `servers`. Embedded (when fastfan is in `servers`): one fastfan with
    --workers 2 and no Redis; the kernel spreads subscribers over both workers, so every
    message crosses the embedded bus to the other one. Nothing is pinned: two nodes,
    Redis and the load generators share both cores.
    """
    rows = []
    for server in (s for s in servers if s in REDIS_SERVERS):
        rows += _through_redis(server, subs, rates, duration)
    if "fastfan" in servers:
        rows += _embedded(subs, rates, duration)
    return rows
