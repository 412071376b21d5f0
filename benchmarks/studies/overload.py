"""A burst above capacity, side by side with the yardstick: who stays connected, what is
delivered meanwhile, how much memory it takes, and how long latency takes to come back.

    ./dev bench --scenarios overload                      # yardstick and fastfan, 1.3x and 2x
    ./dev bench --scenarios overload --servers fastfan --rates 3.9e6 --duration 10

1000 subscribers of one channel (one load generator process, alone on the load
generator's CPU: at these rates it needs all of it) and one publisher (another process, on
the server's CPU, where its few thousand writes a second cost the server under 1%; a
process of its own so that a publisher the server holds back never keeps the subscribers
from reading): 100-byte data at NORMAL deliveries/s for 3 s, then the
burst (each of `rates`, 1.3x and 2x the 3M/s this machine's servers reach on one core) for
`duration` s, then NORMAL again for 8 s. Each burst twice: every subscriber reading, then
with one more subscriber that never reads (a 4 KiB receive window), which alone should be
cut.

Per run: subscribers closed of those that read (goal 0) and whether the stalled one was
(fastfan: its own count of slow consumers cut, `cut_by_server`; the load generator's view,
`stalled_closed`, sees a cut only once the server's close timeout has aborted it);
`burst_per_s`, the deliveries received during the burst per second of it; the publisher's
own rate during the burst (`publisher_per_s`: messages/s it could write); what the readers
never received; peak RSS of the server and its workers; and `recovery_s`: from the end of
the burst, how long until the p99 of the messages sent in each 100 ms window stays within
2x the p99 before the burst (at least 1 ms above it), for the rest of the run. The load
generator's `busy` share says whether it kept up itself (near 1: it did not).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import threading
import time
from typing import Any

from lib import (
    LOADGEN_CPU,
    SERVER_CPU,
    build,
    fastfan_command,
    free_port,
    loadgen_command,
    metrics,
    pinned,
    rss_bytes,
    wait_listening,
)

from .common import stop

SUBSCRIBERS = 1000
NORMAL = 1e6           # deliveries/s before and after the burst
BEFORE, AFTER = 3.0, 8.0
WINDOW_MS = 100
CAPACITY = 3e6         # what fastfan and the yardstick deliver on one core here (the suite)


def _server(name: str, port: int) -> subprocess.Popen[bytes]:
    # fastfan as a user runs it: the suite's 64 MiB --max-buffer (fastfan_command) would
    # keep a stalled subscriber for minutes; the default 1 MiB cuts it in seconds
    command = ([str(build("yardstick")), str(port)] if name == "yardstick"
               else fastfan_command(port, ["--max-buffer", str(1 << 20)]))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=pinned(SERVER_CPU))
    wait_listening(port, process)
    return process


class PeakRss(threading.Thread):
    """The largest RSS of a server and its workers, sampled every 50 ms until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.05):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except OSError:  # a worker that went between listing and reading
                continue

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak


def recovery_seconds(subscribers: dict[str, Any], publisher: dict[str, Any]) -> float | None:
    """Seconds from the burst's end until every later window's p99 is back near the p99
    before the burst (see the module's docstring); None when it never comes back."""
    windows = subscribers["windows"]
    width = subscribers["window_ms"] / 1000
    offset = (publisher["start_ns"] - subscribers["origin_ns"]) / 1e9  # publisher's clock
    phases = publisher["phases"]
    burst_end = offset + phases[0]["seconds"] + phases[1]["seconds"]
    first_after = int(burst_end / width)
    before = [p99 for count, p99, _ in windows[5:int((offset + phases[0]["seconds"]) / width)]
              if count]  # the first half second warms up
    if not before:
        return None
    normal = statistics.median(before)
    limit = max(2 * normal, normal + 1.0)
    last = len(windows) - 1  # the last window is partial
    for index in range(first_after, last):
        if all(p99 <= limit for count, p99, _ in windows[index:last] if count):
            return round(max(float(index * width - burst_end), 0.0), 2)
    return None


def _run(name: str, offered: float, duration: float, stalled: int) -> dict[str, Any]:
    port = free_port()
    server = _server(name, port)
    peak = None
    try:
        total = BEFORE + duration + AFTER
        channel = f"overload{time.time_ns()}"
        subscribers = subprocess.Popen(
            [*loadgen_command(port, subs=SUBSCRIBERS, rate=0, duration=total, channel=channel),
             "--drain", "3", "--sync", "1", "--tolerate-close", "1", "--stall", str(stalled),
             "--window-ms", str(WINDOW_MS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=pinned(LOADGEN_CPU))
        assert subscribers.stdin is not None and subscribers.stdout is not None
        if not subscribers.stdout.readline():
            raise RuntimeError(f"subscribers failed: {subscribers.communicate()[1].strip()}")
        subscribers.stdin.write("go\n")
        subscribers.stdin.flush()
        peak = PeakRss(server.pid)
        normal, burst = NORMAL / SUBSCRIBERS, offered / SUBSCRIBERS  # messages/s
        published = subprocess.run(
            [*loadgen_command(port, subs=0, rate=normal, duration=BEFORE, channel=channel),
             "--drain", "0", "--then", f"{burst:g}:{duration:g},{normal:g}:{AFTER:g}"],
            capture_output=True, text=True, preexec_fn=pinned(SERVER_CPU), timeout=total + 120,
            check=False)
        received, errors = subscribers.communicate(timeout=total + 120)
        if published.returncode or subscribers.returncode:
            raise RuntimeError(f"loadgen failed: {published.stderr.strip()} {errors.strip()}")
        crashed = server.poll() is not None
        cut = (metrics(port).get("fastfan_slow_consumers_disconnected_total")
               if name == "fastfan" and not crashed else None)
    finally:
        peak_rss = peak.stop() if peak is not None else 0
        if server.poll() is None:
            stop(server)
    heard, sent = json.loads(received), json.loads(published.stdout)
    width = heard["window_ms"] / 1000
    offset = (sent["start_ns"] - heard["origin_ns"]) / 1e9
    in_burst = heard["windows"][round((offset + BEFORE) / width):
                                round((offset + BEFORE + duration) / width)]
    return {
        "scenario": "overload", "server": name, "offered_per_s": offered, "burst_s": duration,
        "stalled": stalled, "crashed": crashed,
        "closed": heard["closed"], "stalled_closed": heard["stalled_closed"],
        # received during the burst, per second (what the server kept up with)
        "burst_per_s": round(sum(received for _, _, received in in_burst) / duration),
        "cut_by_server": cut,  # fastfan's slow-consumer count (the stalled one, and others)
        "publisher_per_s": round(sent["phases"][1]["sent"] / duration),
        "delivered": heard["delivered"], "sent": sent["sent"],
        # what the readers never received, when none was closed (the stalled one apart)
        "unreceived": (sent["sent"] * SUBSCRIBERS - heard["delivered"]
                       if heard["closed"] == 0 else None),
        "lost": heard["lost"], "reordered": heard["reordered"],
        "p99_ms": heard["p99_ms"], "max_ms": heard["max_ms"],
        "peak_rss_mib": round(peak_rss / 2**20, 1),
        "recovery_s": recovery_seconds(heard, sent),
        "loadgen_busy": heard["busy"],
    }


def overload(servers: str = "yardstick,fastfan", rates: str | None = None,
             duration: float = 10.0) -> list[dict[str, Any]]:
    offered = [float(r) for r in rates.split(",")] if rates else [1.3 * CAPACITY, 2 * CAPACITY]
    # the servers this study knows how to start; run.py's default list names others too
    names = [name for name in servers.split(",") if name in ("yardstick", "fastfan")]
    rows = []
    print(f"\noverload: {SUBSCRIBERS} subscribers, {NORMAL / 1e6:g}M deliveries/s, then "
          f"{duration:g} s of each burst, then {NORMAL / 1e6:g}M/s again")
    print(f"{'server':>10} {'offered':>9} {'stalled':>7} {'closed':>6} {'cut':>4} {'burst/s':>10} "
          f"{'pub/s':>7} {'unrecvd':>8} {'p99 ms':>8} {'peak MiB':>8} {'recovery s':>10}")
    for rate in offered:
        for stalled in (0, 1):
            for name in names:
                row = _run(name, rate, duration, stalled)
                rows.append(row)
                cut = f"{row['closed']}" + (f"+{row['stalled_closed']}s" if stalled else "")
                print(f"{name:>10} {rate / 1e6:>8.1f}M {stalled:>7} {cut:>6} "
                      f"{row['cut_by_server']!s:>4} "
                      f"{row['burst_per_s'] / 1e6:>9.3f}M {row['publisher_per_s']:>7} "
                      f"{row['unreceived']!s:>8} {row['p99_ms']:>8.1f} {row['peak_rss_mib']:>8} "
                      f"{row['recovery_s']!s:>10}", flush=True)
    return rows
