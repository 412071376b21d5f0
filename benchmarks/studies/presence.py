"""Presence in a channel of many members: the storm of them, `presence`, `presence_stats`.

    ./dev bench --scenarios presence --connections 10000 --processes 10
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any

from lib import Subscribers, free_port, start_fastfan, subscriber

from .common import NO_HEARTBEAT, start_redis, stop


def _ask(port: int, request: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
    """One request on a fresh connection: seconds to its answer, the answer's bytes, it."""
    client = subscriber(port, "asker", timeout=30)
    started = time.monotonic()
    client.send_json(request)
    _, _, payload = client.recv_frame()
    elapsed = time.monotonic() - started
    client.close()
    return elapsed, len(payload), json.loads(payload)


def presence(connections: int = 10_000, processes: int = 10) -> list[dict[str, Any]]:
    """A channel of `connections` members: how long a storm of them takes to be served with
    presence on and off, and how long `presence` (every member listed, --presence-limit
    raised to all) and `presence_stats` take to answer, and their size. With the embedded
    bus (two workers) and with Redis (two nodes of one worker), on this one machine."""
    rows = []
    share = connections // processes
    with tempfile.TemporaryDirectory() as workdir:
        redis_port = free_port()
        redis_server = start_redis(redis_port, workdir)
        try:
            for bus in ("embedded", "redis"):
                for kept in ("on", "off"):
                    ports = [free_port()] if bus == "embedded" else [free_port(), free_port()]
                    extra = ["--presence-limit", str(connections),
                             "--presence-channels", "*" if kept == "on" else "none.*"]
                    extra += (["--workers", "2"] if bus == "embedded"
                              else ["--redis", f"redis://127.0.0.1:{redis_port}/0"])
                    servers = [start_fastfan(port, extra + NO_HEARTBEAT, pin=False)
                               for port in ports]
                    try:
                        started = time.monotonic()
                        with Subscribers([ports[k % len(ports)] for k in range(processes)],
                                         subs=share, channel="crowd",
                                         sources=[f"127.0.0.{2 + k}" for k in range(processes)]
                                         ) as subs:
                            subs.ready()
                            row: dict[str, Any] = {
                                "scenario": "presence", "bus": bus, "presence": kept,
                                "members": share * processes,
                                "all_served_s": round(time.monotonic() - started, 2)}
                            if kept == "on":
                                for kind in ("presence", "presence_stats"):
                                    seconds, size, answer = _ask(
                                        ports[-1], {"type": kind, "channel": "crowd"})
                                    row[f"{kind}_ms"] = round(seconds * 1000, 1)
                                    row[f"{kind}_bytes"] = size
                                    row[f"{kind}_count"] = answer["data"]["count"]
                            subs.go()
                            subs.reports(timeout=60)
                    finally:
                        for server in servers:
                            stop(server)
                    print(f"\npresence: {row}", flush=True)
                    rows.append(row)
        finally:
            redis_server.kill()
    return rows
