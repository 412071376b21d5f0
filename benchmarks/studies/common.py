"""What the studies share: stopping a server, a redis-server of their own, waiting for a
node to be ready, and the tests' raw WebSocket client (tests/wire.py) and its frames."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from types import ModuleType
from typing import Any

from lib import TESTS

# Heartbeats far apart: idle clients that never answer a ping stay connected.
NO_HEARTBEAT = ["--ping-interval", "600", "--ping-timeout", "1200"]


def stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    server.wait(60)


def start_redis(port: int, workdir: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--dir", workdir],
                               stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    return process


def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("fastfan not ready through Redis")


def _wire() -> ModuleType:
    """tests/wire.py, imported only by the studies that speak raw WebSocket."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import wire

    return wire


def text_frame(payload: bytes) -> bytes:
    """A client text frame masked with the zero key (the payload stays as it is)."""
    wire = _wire()
    return bytes(wire.frame_head(wire.TEXT, len(payload)) + wire.ZERO_KEY + payload)


def raw_client(port: int) -> Any:
    """A tests/wire.py RawClient past its welcome, subscribed to nothing."""
    client = _wire().RawClient("127.0.0.1", port, "/", timeout=30)
    client.recv_json()  # welcome
    return client
