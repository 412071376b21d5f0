"""Join/leave in bursts: many clients subscribing at once to a channel others watch.

    ./dev bench --scenarios join-storm --watchers 1000 --joiners 1000
"""

from __future__ import annotations

import contextlib
import selectors
import time
from typing import Any

from lib import cpu_seconds, free_port, start_fastfan

from .common import NO_HEARTBEAT, raw_client, stop


def _count_joins(watchers: list[Any], expected: int, timeout: float = 120) -> None:
    """Read every watcher until each has received `expected` join events."""
    marker = b'"type":"join"'
    selector = selectors.DefaultSelector()
    counts: dict[int, list[Any]] = {}
    for client in watchers:
        client.sock.setblocking(False)
        counts[client.sock.fileno()] = [0, b""]
        selector.register(client.sock, selectors.EVENT_READ, client.sock)
    waiting = len(watchers)
    deadline = time.monotonic() + timeout
    while waiting:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{waiting} watchers still wait for their joins")
        for key, _ in selector.select(1):
            sock = key.data
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            state = counts[sock.fileno()]
            text = state[1] + data
            state[0] += text.count(marker)
            state[1] = text[-(len(marker) - 1):]
            if state[0] >= expected:
                selector.unregister(sock)
                waiting -= 1
    selector.close()


def join_storm(watchers: int = 1000, joiners: int = 1000) -> list[dict[str, Any]]:
    """`joiners` clients subscribing at once to a channel that `watchers` others watch with
    "joinLeave": true: watchers x joiners join frames, by the contract one per event. How
    long until every watcher has them all, and the server's CPU for it (one worker)."""
    port = free_port()
    server = start_fastfan(port, NO_HEARTBEAT, pin=False)
    try:
        watching = []
        for _ in range(watchers):
            client = raw_client(port)
            client.send_json({"type": "subscribe", "channel": "crowd", "joinLeave": True})
            while client.recv_json()["type"] != "subscribed":
                pass  # the joins of the watchers after it
            watching.append(client)
        joining = [raw_client(port) for _ in range(joiners)]
        time.sleep(0.5)
        for client in watching:  # what the watchers' own joins left queued
            client.sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while client.sock.recv(1 << 20):
                    pass
            client.sock.setblocking(True)
        cpu = cpu_seconds(server.pid)
        started = time.monotonic()
        for client in joining:
            client.send_json({"type": "subscribe", "channel": "crowd"})
        _count_joins(watching, joiners)
        row = {"scenario": "join-storm", "watchers": watchers, "joiners": joiners,
               "frames": watchers * joiners,
               "all_received_s": round(time.monotonic() - started, 2),
               "server_cpu_s": round(cpu_seconds(server.pid) - cpu, 2)}
        for client in watching + joining:
            client.close()
    finally:
        stop(server)
    print(f"\njoin-storm: {row}", flush=True)
    return [row]
