"""The fan-out benchmark: SUBS subscribers on one channel, open-loop publish rates.

    ./dev bench                          # 1000 subscribers, 100-byte data, 50k..1M deliveries/s
    ./dev bench --rates 50000,1000000 --duration 10
    ./dev bench --self-test              # shows the load generator is not the bottleneck

The server runs on CPU 0 and the load generator (benchmarks/loadgen.c, compiled here) on
CPU 1. For each offered rate it prints delivered/s, loss, latency percentiles, and the
server's CPU time per delivery; the JSON lands in benchmarks/results/ (not in git).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
RESULTS = HERE / "results"
SERVER_CPU, LOADGEN_CPU = 0, 1


def build_loadgen() -> Path:
    binary = BUILD / "loadgen"
    source = HERE / "loadgen.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        BUILD.mkdir(exist_ok=True)
        subprocess.run(["cc", "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cpu: int) -> Any:
    return lambda: os.sched_setaffinity(0, {cpu})


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def server_pids(master: int) -> list[int]:
    """The master and its workers."""
    pids = [master]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(int(entry.name))[1]) == master:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def cpu_seconds(master: int) -> float:
    """utime + stime of the master and its workers, from /proc."""
    ticks = 0
    for pid in server_pids(master):
        fields = _stat(pid)
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def start_fastfan(port: int, extra: list[str], pin: bool = True) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "fastfan", "run", "--insecure", "--host", "127.0.0.1",
               "--port", str(port), "--publish-rate", "100000000", "--log-level", "warning",
               *extra]
    server = subprocess.Popen(command, preexec_fn=pinned(SERVER_CPU) if pin else None)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("fastfan did not start")


def run_loadgen(loadgen: Path, port: int, subs: int, rate: float, size: int,
                duration: float) -> dict[str, Any]:
    result = subprocess.run(
        [str(loadgen), "--port", str(port), "--subs", str(subs), "--rate", str(rate),
         "--size", str(size), "--duration", str(duration), "--channel", f"bench{time.time_ns()}"],
        capture_output=True, text=True, preexec_fn=pinned(LOADGEN_CPU), timeout=duration + 120)
    if result.returncode != 0:
        raise RuntimeError(f"loadgen failed: {result.stderr.strip()}")
    return dict(json.loads(result.stdout))


def measure(loadgen: Path, port: int, pid: int, subs: int, offered: float, size: int,
            duration: float) -> dict[str, Any]:
    before = cpu_seconds(pid)
    row = run_loadgen(loadgen, port, subs, offered / subs, size, duration)
    used = cpu_seconds(pid) - before
    row["server_cpu_s"] = round(used, 3)
    row["cpu_us_per_delivery"] = round(1e6 * used / max(row["delivered"], 1), 3)
    return row


HEADER = (f"{'offered/s':>10} {'delivered/s':>12} {'lost':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'p99.9 ms':>9} {'max ms':>8} {'CPU us/deliv':>12}")


def format_row(r: dict[str, Any]) -> str:
    cpu = r.get("cpu_us_per_delivery")
    return (f"{r['offered_per_s']:>10.0f} {r['delivered_per_s']:>12.0f} {r['lost']:>8} "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['p999_ms']:>9.2f} "
            f"{r['max_ms']:>8.2f} {'-' if cpu is None else f'{cpu:.3f}':>12}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subs", type=int, default=1000)
    parser.add_argument("--size", type=int, default=100, help="bytes of data per message")
    parser.add_argument("--rates", default="50000,100000,200000,500000,1000000",
                        help="offered deliveries per second, comma-separated")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per rate")
    parser.add_argument("--server-args", default="", help="extra `fastfan run` options")
    args = parser.parse_args()

    loadgen = build_loadgen()
    port = free_port()
    server = start_fastfan(port, args.server_args.split())
    rows = []
    print(f"{args.subs} subscribers, one channel, {args.size}-byte data, {args.duration:g} s "
          f"per rate; server on CPU {SERVER_CPU}, load generator on CPU {LOADGEN_CPU}\n{HEADER}")
    try:
        for offered in (float(r) for r in args.rates.split(",")):
            rows.append(measure(loadgen, port, server.pid, args.subs, offered, args.size,
                                args.duration))
            print(format_row(rows[-1]), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"fanout-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\n{len(rows)} rates; JSON in {out.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
