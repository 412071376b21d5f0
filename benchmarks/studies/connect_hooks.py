"""connects/s of a reconnect storm through each way a client is let in (issue #32): a
JWT the server checks, an `authenticate` hook in Python, the connect proxy (a backend
written to Centrifugo's proxy documentation, in a process of its own); --insecure, which
checks nothing, as the floor. One worker, clients from `processes` load generators at once.

    ./dev bench --scenarios connect-hooks --connections 10000 --processes 20
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lib import Subscribers, free_port, wait_listening

from fastfan.auth import mint_token

from .common import NO_HEARTBEAT, stop

SECRET = "a-benchmark-secret-of-at-least-32-bytes!"
HERE = Path(__file__).resolve().parent.parent


def _server(port: int, admission: list[str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "fastfan", "run", "--host", "127.0.0.1", "--port",
               str(port), "--log-level", "warning", "--max-connections-per-user", "0",
               *NO_HEARTBEAT, *admission]
    server = subprocess.Popen(command, cwd=HERE)  # --app apps.NAME:app from here
    wait_listening(port, server)
    return server


def _storm(port: int, connections: int, processes: int, path: str) -> float:
    """Seconds until every client of the storm is welcomed and subscribed."""
    share = connections // processes
    started = time.monotonic()
    with Subscribers([port] * processes, subs=share, channel="storm",
                     sources=[f"127.0.0.{2 + k % 200}" for k in range(processes)],
                     extra=["--path", path]) as subs:
        subs.ready()
        elapsed = time.monotonic() - started
        subs.go()
        subs.reports(timeout=60)
    return elapsed


def connect_hooks(connections: int = 10_000, processes: int = 20) -> list[dict[str, Any]]:
    token = mint_token(SECRET, "bench")
    backend_port = free_port()
    backend = subprocess.Popen([sys.executable, "-m", "studies.proxy_backend",
                                str(backend_port)], cwd=HERE)
    variants = {
        "--insecure": (["--insecure"], "/"),
        "JWT (HS256)": (["--jwt-secret", SECRET], f"/?token={token}"),
        "authenticate hook": (["--app", "apps.authenticate:app"], "/"),
        "connect proxy": (["--proxy-connect", f"http://127.0.0.1:{backend_port}/connect"], "/"),
    }
    rows = []
    try:
        wait_listening(backend_port, backend)
        print(f"\nconnect-hooks: {connections} clients from {processes} processes, one worker")
        for variant, (admission, path) in variants.items():
            port = free_port()
            server = _server(port, admission)
            try:
                elapsed = _storm(port, connections, processes, path)
            finally:
                stop(server)
            total = connections // processes * processes
            row = {"scenario": "connect-hooks", "variant": variant, "clients": total,
                   "all_served_s": round(elapsed, 2), "connects_per_s": round(total / elapsed)}
            rows.append(row)
            print(f"{variant:20} {row['connects_per_s']:>8,} connects/s "
                  f"({row['all_served_s']} s)", flush=True)
    finally:
        stop(backend)
    return rows
