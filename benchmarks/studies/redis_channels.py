"""The redis-channels study: one node's Redis path against Redis's own speed (issue #31).

    ./dev bench --scenarios redis-channels --servers fastfan,seed,socketio \
        --rates 20000,50000,100000,150000,200000 --duration 4
    ./dev bench --scenarios redis-channels --servers baseline,fastfan \
        --baseline ../base/.venv/bin/python       # before and after a change

One node of each server publishing and subscribing through one redis-server: 1000
channels of one subscriber each, so that every delivery is a message through Redis and
back (PUBLISH out, the pushed message in). The node is pinned to the server CPU, the load
generator (1000 subscribers and the publisher, one process) to the other; Redis is not
pinned. Per rate: delivered/s, lost, latency, and the node's CPU per message. The ceiling
is Redis's: redis-benchmark's PUBLISH rate on the same Redis, in the same run, first.
fastfan runs twice, without and with history on the channels (--history-size 100), as
history's numbering script costs Redis more than a PUBLISH.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
from typing import Any

from lib import (
    HEADER,
    PEERS,
    SERVER_CPU,
    format_row,
    free_port,
    pinned,
    protocol_args,
    rss_bytes,
    run_loadgen_measuring,
    wait_listening,
)

from .common import start_redis, stop

REDIS_FORMS = ("fastfan", "baseline", "seed", "socketio")  # servers that run through Redis
RATES = (20e3, 50e3, 100e3, 150e3, 200e3)
CHANNELS = 1000
# what the benchmark publishes: a message's size (no quotes: its CSV output does not escape)
PAYLOAD = b"x" * 100


def redis_benchmark_publish(port: int) -> float:
    """redis-benchmark's PUBLISH rate (50 clients, no pipelining: its defaults)."""
    result = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-n", "300000", "-q", "--csv", "PUBLISH",
         "fastfan:bench", PAYLOAD], capture_output=True, text=True, timeout=120, check=True)
    *_, last = csv.reader(result.stdout.strip().splitlines())  # "test","rps",...
    return float(last[1])


def _command(server: str, port: int, redis_port: int, baseline: str | None,
             extra: list[str]) -> list[str]:
    url = f"redis://127.0.0.1:{redis_port}/0"
    if server in ("fastfan", "baseline"):
        if server == "baseline" and baseline is None:
            raise ValueError("the server baseline needs --baseline PYTHON")
        # (-P: the baseline's own fastfan, not this checkout's from the working directory)
        python = [baseline, "-P"] if server == "baseline" else [sys.executable]
        return [*python, "-m", "fastfan", "run", "--insecure", "--host", "127.0.0.1",
                "--port", str(port), "--publish-rate", "100000000", "--log-level", "warning",
                "--max-buffer", str(64 << 20), "--redis", url, *extra]
    script = {"seed": "seed.js", "socketio": "socketio.js"}[server]
    return ["node", str(PEERS / script), str(port), str(redis_port)]


def _sweep(name: str, command: list[str], rates: tuple[float, ...], duration: float,
           protocol: list[str], port: int) -> list[dict[str, Any]]:
    rows = []
    node = subprocess.Popen(command, preexec_fn=pinned(SERVER_CPU))
    try:
        wait_listening(port, node)
        print(f"\n{name}: one node through Redis, {CHANNELS} channels x 1 subscriber\n{HEADER}")
        for offered in rates:
            row = run_loadgen_measuring(node.pid, port, subs=CHANNELS, channels=CHANNELS,
                                        rate=offered, duration=duration, size=100,
                                        extra=protocol)
            # (each delivery is one message through Redis)
            row["cpu_us_per_delivery"] = round(1e6 * row.pop("server_cpu_s")
                                               / max(row["delivered"], 1), 2)
            row["rss_mib"] = round(rss_bytes(node.pid) / 2**20, 1)
            row.update(server=name, scenario="redis-channels", offered_per_s=offered)
            rows.append(row)
            print(format_row(row), flush=True)
            if row["delivered_per_s"] < offered / 2:
                break  # saturated: higher rates say nothing more
    finally:
        stop(node)
    return rows


def redis_channels(servers: str = "fastfan,seed,socketio", rates: str | None = None,
                   duration: float = 4.0, baseline: str | None = None) -> list[dict[str, Any]]:
    offered = tuple(float(r) for r in rates.split(",")) if rates else RATES
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as workdir:
        redis_port = free_port()
        redis_server = start_redis(redis_port, workdir)
        try:
            ceiling = redis_benchmark_publish(redis_port)
            print(f"redis-benchmark PUBLISH on this Redis: {ceiling:,.0f}/s")
            rows.append({"server": "redis-benchmark", "scenario": "redis-channels",
                         "publish_per_s": ceiling})
            for server in (s for s in servers.split(",") if s in REDIS_FORMS):
                runs: list[tuple[str, list[str]]] = [(server, [])]
                if server in ("fastfan", "baseline"):
                    runs.append((f"{server}+history", ["--history-size", "100"]))
                for name, extra in runs:
                    port = free_port()
                    rows += _sweep(name, _command(server, port, redis_port, baseline, extra),
                                   offered, duration, protocol_args(server), port)
        finally:
            redis_server.terminate()
            redis_server.wait(10)
    return rows
