"""Past one Redis: three standalone shards and a Redis Cluster against one Redis.

    ./dev bench --scenarios shards --rates 10000,20000,40000,80000 --duration 4
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from typing import Any

from lib import HEADER, Subscribers, cpu_seconds, format_row, free_port, run_loadgen, start_fastfan

from .common import stop, wait_ready

SHARD_TOPOLOGIES = ("one", "three", "cluster")


def _redis_cpu(processes: list[subprocess.Popen[bytes]]) -> float:
    return sum(cpu_seconds(process.pid) for process in processes)


def _start_topology(topology: str, workdir: str) -> tuple[list[subprocess.Popen[bytes]], str]:
    """The redis-servers of `topology` and fastfan's --redis for them: one, three
    standalone shards, or a cluster of three masters (no replicas: each message once)."""
    count = 1 if topology == "one" else 3
    ports = [free_port() for _ in range(count)]
    while topology == "cluster" and any(port > 55000 for port in ports):
        ports = [free_port() for _ in range(count)]  # each with its bus port, + 10000
    cluster = ["--cluster-enabled", "yes", "--cluster-config-file"] if topology == "cluster" \
        else []
    processes = [subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir,
         *([*cluster, f"nodes-{port}.conf"] if cluster else [])],
        stdout=subprocess.DEVNULL) for port in ports]
    time.sleep(0.3)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    if topology == "cluster":
        subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas",
                        "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        while b"cluster_state:ok" not in subprocess.run(
                ["redis-cli", "-p", str(ports[0]), "cluster", "info"], capture_output=True,
                check=True).stdout:
            time.sleep(0.1)
        return processes, "redis+cluster://" + ",".join(addresses)
    return processes, ",".join(f"redis://{address}/0" for address in addresses)


def shards(rates: str = "100000,200000,400000,600000", duration: float = 4.0,
           channels: int = 1000) -> list[dict[str, Any]]:
    """Deliveries/s through one Redis, three standalone shards (--redis URL1,URL2,URL3)
    and a Redis Cluster of three masters (redis+cluster://): two fastfan nodes, `channels`
    channels each with one subscriber on each node, one publisher on the first node going
    round-robin over the channels, so every message crosses Redis to both nodes. Redis's
    CPU (all its processes) per message published, and its busiest process's share of a
    core. Nothing is pinned: two nodes, Redis and the load generators share the cores.
    """
    rows = []
    for topology in SHARD_TOPOLOGIES:
        with tempfile.TemporaryDirectory() as workdir:
            redis_servers, url = _start_topology(topology, workdir)
            nodes = [free_port(), free_port()]
            processes = [start_fastfan(port, ["--redis", url], pin=False) for port in nodes]
            try:
                for port in nodes:
                    wait_ready(port)
                print(f"\nfastfan through {topology} Redis: two nodes, {channels} channels"
                      f"\n{HEADER}  redis us/msg  busiest redis  node us/msg (publisher, "
                      f"other)", flush=True)
                for n, offered in enumerate(float(rate) for rate in rates.split(",")):
                    row = _channels_run(nodes, channels, offered, duration, f"s{n}",
                                        redis_servers, processes)
                    rows.append({"server": f"fastfan+{topology}", "scenario": "shards", **row})
                    print(f"{format_row(row)}  {row['redis_us_per_msg']:12.2f}"
                          f"  {row['redis_busiest_core']:12.0%}  "
                          f"{row['node_us_per_msg'][0]:8.1f} {row['node_us_per_msg'][1]:6.1f}",
                          flush=True)
            finally:
                for process in processes:
                    stop(process)
                for server in redis_servers:
                    server.terminate()
                    server.wait(10)
    return rows


def _channels_run(ports: list[int], channels: int, offered: float, duration: float,
                  channel: str, redis_servers: list[subprocess.Popen[bytes]],
                  nodes: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """`channels` subscribers on each of `ports`, one per channel; a publisher on the first
    at offered / len(ports) messages/s; one summary row, with Redis's CPU and the nodes'."""
    spread = ["--channels", str(channels)]
    with Subscribers(ports, subs=channels, channel=channel, duration=duration, drain=2,
                     extra=spread) as subscribers:
        subscribers.ready()
        time.sleep(0.5)  # let every node's SUBSCRIBE reach Redis
        cpu = [cpu_seconds(server.pid) for server in redis_servers]
        node_cpu = [cpu_seconds(node.pid) for node in nodes]
        started = time.monotonic()
        subscribers.go()
        sent = run_loadgen(ports[0], subs=0, rate=offered / len(ports), duration=duration,
                           channel=channel, channels=channels, pin=False,
                           extra=["--drain", "0"])["sent"]
        elapsed = time.monotonic() - started
        used = [cpu_seconds(server.pid) - before
                for server, before in zip(redis_servers, cpu, strict=True)]
        reports = subscribers.reports(timeout=duration + 60)
        node_used = [cpu_seconds(node.pid) - before
                     for node, before in zip(nodes, node_cpu, strict=True)]
    delivered = sum(r["delivered"] for r in reports)
    return {
        "offered_per_s": offered, "sent": sent,
        "delivered_per_s": sum(r["delivered_per_s"] for r in reports),
        "lost": sent * len(ports) - delivered,
        **{key: max(r[key] for r in reports) for key in ("p50_ms", "p99_ms", "p999_ms", "max_ms")},
        "redis_us_per_msg": sum(used) / max(sent, 1) * 1e6,
        "redis_busiest_core": max(used) / elapsed,
        "cpu_us_per_delivery": sum(node_used) / max(delivered, 1) * 1e6,
        "node_us_per_msg": [used_ / max(sent, 1) * 1e6 for used_ in node_used],
    }
