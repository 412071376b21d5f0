"""What the benchmark scenarios share: building the C tools, starting servers, clients,
measuring. (tests/ imports `build_loadgen` from here too.)"""

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
TESTS = HERE.parent / "tests"  # wire.py: a WebSocket client on a bare socket
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


FASTFAN_ARGS: list[str] = []  # run.py's --fastfan-args, e.g. "--workers 2": last, so they win


def fastfan_command(port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "fastfan", "run", "--insecure", "--host", "127.0.0.1",
            "--port", str(port), "--publish-rate", "100000000", "--log-level", "warning",
            "--max-buffer", str(64 << 20), *extra, *FASTFAN_ARGS]


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


def loadgen_command(port: int, *, subs: int, rate: float, size: int = 100,
                    duration: float = 5, channels: int = 1, channel: str | None = None,
                    extra: list[str] | None = None) -> list[str]:
    """The load generator's command line: `subs` subscribers, and publishers at `rate`
    messages/s each."""
    return [str(build_loadgen()), "--port", str(port), "--subs", str(subs), "--rate",
            str(rate), "--size", str(size), "--duration", str(duration), "--channels",
            str(channels), "--channel", channel or f"bench{time.time_ns()}", *(extra or [])]


def run_loadgen(port: int, *, pin: bool = True, **options: Any) -> dict[str, Any]:
    """One open-loop run (pinned to the load generator's CPU unless `pin` is False), its
    JSON summary; `options` as loadgen_command's. `subs=0` with `--drain 0` is a publisher
    alone."""
    result = subprocess.run(loadgen_command(port, **options), capture_output=True, text=True,
                            preexec_fn=pinned(LOADGEN_CPU) if pin else None,
                            timeout=options.get("duration", 5) + 300, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"loadgen failed: {result.stderr.strip()}")
    return dict(json.loads(result.stdout))


def run_loadgen_measuring(server_pid: int, port: int, **options: Any) -> dict[str, Any]:
    """run_loadgen(), and the CPU seconds the server (and its workers) spent from the first
    publish to the summary as `server_cpu_s`: not connecting and subscribing the load
    generator's clients, nor closing them, which the connection studies measure."""
    command = [*loadgen_command(port, **options), "--sync", "2"]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=pinned(LOADGEN_CPU)) as process:
        assert process.stdin is not None and process.stdout is not None
        ready = process.stdout.readline()
        before = cpu_seconds(server_pid)
        process.stdin.write("go\n")
        process.stdin.flush()
        summary = process.stdout.readline()
        used = cpu_seconds(server_pid) - before
        process.stdin.close()  # it closes its connections and exits
        errors = process.stderr.read() if process.stderr is not None else ""
        process.wait(60)
    if not ready or not summary or process.returncode != 0:
        raise RuntimeError(f"loadgen failed: {errors.strip()}")
    return {**json.loads(summary), "server_cpu_s": used}


class Subscribers:
    """Load generator processes that connect and subscribe, then wait (`--sync 1`): one
    per port in `ports` (a port may repeat), `subs` connections each, from `sources[k]`
    when given. `ready()` returns once all are subscribed, `go()` lets them receive for
    `duration` s, `reports()` collects their summaries; leaving the `with` kills them."""

    def __init__(self, ports: list[int], *, subs: int, channel: str, duration: float = 0,
                 drain: float = 0, sources: list[str] | None = None,
                 extra: list[str] | None = None, pin: bool = False) -> None:
        self.processes = [
            subprocess.Popen(
                [str(build_loadgen()), "--port", str(port), "--subs", str(subs), "--rate", "0",
                 "--sync", "1", "--channel", channel, "--duration", str(duration), "--drain",
                 str(drain), *(["--sources", sources[k]] if sources else []), *(extra or [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                preexec_fn=pinned(LOADGEN_CPU) if pin else None)
            for k, port in enumerate(ports)]

    def __enter__(self) -> Subscribers:
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    def ready(self) -> None:
        for process in self.processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line or not json.loads(line).get("ready"):
                raise RuntimeError(f"subscribers not ready: {line.strip() or 'exited'}")

    def go(self) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()

    def reports(self, timeout: float = 120) -> list[dict[str, Any]]:
        return [dict(json.loads(p.communicate(timeout=timeout)[0])) for p in self.processes]


def metrics(port: int) -> dict[str, float]:
    """GET /metrics as {series (labels included): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def subscriber(port: int, channel: str, **options: Any) -> Any:
    """A subscribed tests/wire.py RawClient (options: timeout, source, receive_buffer)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from wire import RawClient

    client = RawClient("127.0.0.1", port, "/", **options)
    client.recv_json()  # welcome
    client.send_json({"type": "subscribe", "channel": channel})
    client.recv_json()  # subscribed
    return client


HEADER = (f"{'offered/s':>10} {'delivered/s':>12} {'lost':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'p99.9 ms':>9} {'max ms':>8} {'CPU us/deliv':>12} {'RSS MiB':>8}")


def format_row(r: dict[str, Any]) -> str:
    cpu, rss = r.get("cpu_us_per_delivery"), r.get("rss_mib")
    return (f"{r['offered_per_s']:>10.0f} {r['delivered_per_s']:>12.0f} {r['lost']:>8} "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['p999_ms']:>9.2f} "
            f"{r['max_ms']:>8.2f} {'-' if cpu is None else f'{cpu:.3f}':>12} "
            f"{'-' if rss is None else f'{rss:.1f}':>8}")
