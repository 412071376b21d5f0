"""What the benchmark scripts share: building the C tools, starting servers, measuring."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
RESULTS = HERE / "results"
PEERS = HERE / "peers"
SERVER_CPU, LOADGEN_CPU = 0, 1


def build(name: str) -> Path:
    """Compile benchmarks/NAME.c into benchmarks/build/NAME when the source is newer."""
    binary, source = BUILD / name, HERE / f"{name}.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        BUILD.mkdir(exist_ok=True)
        subprocess.run(["cc", "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def build_loadgen() -> Path:
    return build("loadgen")


def protocol_args(server: str) -> list[str]:
    """The load generator's options for SERVER's framing: Socket.IO has its own."""
    return ["--protocol", "socketio"] if server.startswith("socketio") else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cpu: int) -> Callable[[], None]:
    return lambda: os.sched_setaffinity(0, {cpu})


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def server_pids(root: int) -> list[int]:
    """A server process and its children (fastfan's workers)."""
    pids = [root]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(int(entry.name))[1]) == root:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def cpu_seconds(root: int) -> float:
    """utime + stime of a server and its children, from /proc."""
    ticks = sum(int(f[11]) + int(f[12]) for f in map(_stat, server_pids(root)))
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_bytes(root: int) -> int:
    total = 0
    for pid in server_pids(root):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def fastfan_command(port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "fastfan", "run", "--insecure", "--host", "127.0.0.1",
            "--port", str(port), "--publish-rate", "100000000", "--log-level", "warning",
            "--max-buffer", str(64 << 20), *extra]


def start_fastfan(port: int, extra: list[str], pin: bool = True) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(fastfan_command(port, extra),
                              preexec_fn=pinned(SERVER_CPU) if pin else None)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("fastfan did not start")


def run_loadgen(port: int, *, subs: int, rate: float, size: int = 100, duration: float = 5,
                channels: int = 1, extra: list[str] | None = None) -> dict[str, Any]:
    """One open-loop run pinned to the load generator's CPU; its JSON summary."""
    command = [str(build_loadgen()), "--port", str(port), "--subs", str(subs), "--rate",
               str(rate), "--size", str(size), "--duration", str(duration), "--channels",
               str(channels), "--channel", f"bench{time.time_ns()}", *(extra or [])]
    result = subprocess.run(command, capture_output=True, text=True,
                            preexec_fn=pinned(LOADGEN_CPU), timeout=duration + 300, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"loadgen failed: {result.stderr.strip()}")
    return dict(json.loads(result.stdout))


HEADER = (f"{'offered/s':>10} {'delivered/s':>12} {'lost':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'p99.9 ms':>9} {'max ms':>8} {'CPU us/deliv':>12} {'RSS MiB':>8}")


def format_row(r: dict[str, Any]) -> str:
    cpu, rss = r.get("cpu_us_per_delivery"), r.get("rss_mib")
    return (f"{r['offered_per_s']:>10.0f} {r['delivered_per_s']:>12.0f} {r['lost']:>8} "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['p999_ms']:>9.2f} "
            f"{r['max_ms']:>8.2f} {'-' if cpu is None else f'{cpu:.3f}':>12} "
            f"{'-' if rss is None else f'{rss:.1f}':>8}")
