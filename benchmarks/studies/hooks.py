"""Publishes/s through the application's hooks (--app) against none: one publisher,
closed loop (bursts of BURST publishes, the last acknowledged, then the next burst), no
subscriber, so the figure is the request path's cost; and the server's CPU per publish.

    ./dev bench --scenarios hooks --duration 3 --repeat 3
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lib import cpu_seconds, free_port, start_fastfan, wait_listening

from .common import NO_HEARTBEAT, raw_client, stop, text_frame

BURST = 500
# variant -> `fastfan run` options (PROXY: the backend's URL, started by the study)
VARIANTS: dict[str, list[str]] = {
    "no --app": [],
    "--app without publish hooks": ["--app", "apps.rpc_only:app"],
    "can_publish: allow": ["--app", "apps.allow:app"],
    "can_publish: check and rewrite": ["--app", "apps.rewrite:app"],
    "publish proxy (allow)": ["--proxy-publish", "PROXY/publish"],
}
HERE = Path(__file__).resolve().parent.parent


def _burst() -> bytes:
    messages: list[dict[str, Any]] = [
        {"type": "publish", "channel": "bench.hooks", "data": {"text": "x" * 64}}
        for _ in range(BURST - 1)]
    messages.append({**messages[0], "id": 1})
    return b"".join(text_frame(json.dumps(m).encode()) for m in messages)


def _publish_for(port: int, duration: float) -> int:
    """Bursts until `duration` s have passed; how many publishes were acknowledged."""
    burst, ack = _burst(), b'"id":1}'
    client = raw_client(port)
    published = 0
    stop_at = time.monotonic() + duration
    buffer = b""
    while time.monotonic() < stop_at:
        client.sock.sendall(burst)
        while ack not in buffer:
            buffer += client.sock.recv(65536)
        buffer = buffer[buffer.index(ack) + len(ack):]
        published += BURST
    client.close()
    return published


def hooks(*, duration: float = 3.0, repeat: int = 3) -> list[dict[str, Any]]:
    os.chdir(HERE)  # --app apps.NAME:app is imported from the working directory
    rows: list[dict[str, Any]] = []
    backend_port = free_port()  # the publish proxy's (a process of its own, not pinned)
    backend = subprocess.Popen([sys.executable, "-m", "studies.proxy_backend",
                                str(backend_port)])
    wait_listening(backend_port, backend)
    proxy = f"http://127.0.0.1:{backend_port}"
    for round_ in range(repeat):
        for variant, options in VARIANTS.items():
            port = free_port()
            server = start_fastfan(port, [*NO_HEARTBEAT, *(
                option.replace("PROXY", proxy) for option in options)])
            try:
                _publish_for(port, 0.5)  # warm up
                cpu = cpu_seconds(server.pid)
                started = time.monotonic()
                published = _publish_for(port, duration)
                elapsed = time.monotonic() - started
                cpu = cpu_seconds(server.pid) - cpu
            finally:
                stop(server)
            rows.append({"scenario": "hooks", "variant": variant, "round": round_,
                         "publishes_per_s": round(published / elapsed),
                         "cpu_us_per_publish": round(cpu / published * 1e6, 2)})
            print(f"{variant:34} {published / elapsed:>10,.0f} publishes/s "
                  f"{cpu / published * 1e6:6.2f} us CPU each", flush=True)
    stop(backend)
    return rows
