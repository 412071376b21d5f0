"""The benchmark suite: fastfan, its peers and the C yardstick, side by side in one run;
and the studies (benchmarks/studies/) beside it. docs/benchmarks.md has the figures.

    ./dev bench --duration 3        # every suite scenario, every server (about 20 minutes)
    ./dev bench --quick             # CI: a load every server sustains; fails on a crash or loss
    ./dev bench --servers fastfan,yardstick --scenarios fanout --duration 10
    ./dev bench --servers yardstick,fastfan,uws --scenarios fanout --repeat 3   # the targets
    ./dev bench --scenarios churn --cycles 20000                                # a study
    ./dev bench --scenarios fanout-pusher --repeat 3    # Pusher's subscribers against fastfan's

Every server runs pinned to CPU 0 and the load generator (benchmarks/loadgen.c) to CPU 1,
one server at a time, at the same offered rates. The suite's scenarios (the default):

  fanout    1000 subscribers on one channel, 100-byte data, 50k to 3M deliveries/s
  channels  10,000 channels of 10 subscribers: 10,000 connections subscribed to 10 channels
            each (a process holds at most ~20,000 sockets here: not 100,000 connections)
  large     1000 subscribers, 16 KiB data
  headroom  the load generator against benchmarks/firehose.c (a sender with no cost per
            message): what it can receive with 100-byte and 16 KiB data, against the fastest
            server's delivered/s in the fanout and large scenarios
  idle      10,000 subscribed idle connections: server RSS per connection
  workers   the fan-out sweep, fastfan with one worker against two on the same core (half
            the subscribers on the publisher's worker, half across the embedded bus)
  fanout-pusher  the fan-out sweep on fastfan with a Pusher app: fastfan (its own protocol,
            a WebSocket publisher), fastfan-api (its own protocol, subscribed to the
            Pusher channel's fastfan name, published through the server API as Pusher
            events) and fastfan-pusher (Pusher's protocol 7 on /app/KEY, the same
            publishes): Pusher's subscribers against fastfan's (CPU per delivery, p99)
  redis     two nodes through one redis-server: fastfan --redis, the seed's ws + ioredis,
            Socket.IO with its Redis adapter, and fastfan --workers 2 on the embedded bus
            (not pinned)

Studies, run only when named (fastfan alone; options under "studies" in --help):
connections, churn, storm, slow-consumer, soak, accept-spread, presence, api, shards (one Redis
against three shards and a three-master cluster, two nodes, many channels), wire
(permessage-deflate and TLS: CPU and bytes per delivery against plain), history (history and
recovery on against off), join-storm (join/leave in bursts), hooks (publishes/s through a
Python can_publish against none), redis-channels (one node through one Redis, 1000
channels of one subscriber: fastfan, with history too, beside the seed and Socket.IO and
under redis-benchmark's PUBLISH rate; --servers names them), connect-hooks (a connect
storm through a JWT, an authenticate hook and the connect proxy), overload (a burst of
1.3x and 2x capacity beside the yardstick: who is closed, what is delivered, peak memory,
how long p99 takes to come back; --servers yardstick,fastfan).

Servers: yardstick (benchmarks/yardstick.c), fastfan, uws (uWebSockets.js), seed (the
article's Node ws design), websockets (Python's websockets with its broadcast), socketio
(Socket.IO; the seed protocol as Socket.IO events, the load generator's --protocol socketio).

A server that delivers less than half of what is offered, or loses more than 1%, is
saturated: its higher rates in that scenario are skipped. Results: a table on stdout,
benchmarks/results/suite-*/suite.json, and PNG plots (delivered and p99 against offered).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lib
from lib import (
    HEADER,
    PEERS,
    RESULTS,
    SERVER_CPU,
    Subscribers,
    build,
    build_loadgen,
    fastfan_command,
    format_row,
    free_port,
    pinned,
    protocol_args,
    rss_bytes,
    run_loadgen,
    run_loadgen_measuring,
    wait_listening,
)
from studies.accept_spread import accept_spread
from studies.api import api
from studies.churn import churn
from studies.connect_hooks import connect_hooks
from studies.connections import connections
from studies.deflate_tls import wire
from studies.history import history
from studies.hooks import hooks
from studies.join_storm import join_storm
from studies.overload import overload
from studies.presence import presence
from studies.redis_channels import redis_channels
from studies.redis_path import redis
from studies.shards import shards
from studies.slow_consumer import slow_consumer
from studies.soak import soak
from studies.storm import storm


@dataclass(frozen=True)
class Scenario:
    name: str
    subs: int
    size: int
    channels: int
    rates: tuple[float, ...]
    per_conn: int = 1  # channels each subscriber connection takes


SCENARIOS = {
    "fanout": Scenario("fanout", 1000, 100, 1,
                       (50e3, 100e3, 200e3, 500e3, 1e6, 2e6, 3e6)),
    # 10,000 channels of 10 subscribers: 10,000 connections of 10 subscriptions each (a
    # process holds at most ~20,000 sockets here, so not 100,000 connections of one).
    "channels": Scenario("channels", 10_000, 100, 10_000, (50e3, 200e3, 500e3, 1e6),
                         per_conn=10),
    "large": Scenario("large", 1000, 16384, 1, (10e3, 50e3, 100e3, 200e3)),
}
QUICK = Scenario("quick", 200, 100, 1, (10e3,))
IDLE_CONNECTIONS = 10_000
# fanout-pusher's server: one Pusher app, and the server API its publisher goes through
PUSHER_APP_ID, PUSHER_KEY = "1", "bench-key"
API_KEY = "bench-api-key"
# Through the API: the Pusher event named so, on the Pusher channel's fastfan name
API_PUBLISH = ["--publish", "api", "--api-key", API_KEY, "--api-event", "bench"]
FANOUT_PUSHER = ("fastfan", "fastfan-api", "fastfan-pusher")  # that scenario's servers



# --baseline PYTHON: "baseline" is fastfan as another checkout's interpreter runs it, e.g.
# a worktree of the commit before a change (git worktree add ../base HEAD~1, then its
# ./dev bench once to build it), so that before and after are measured side by side.
BASELINE_PYTHON: list[str] = []


def server_commands(port: int, api_port: int) -> dict[str, list[str]]:
    # -P: its own fastfan, not this checkout's from the working directory
    baseline = [*BASELINE_PYTHON, "-P", *fastfan_command(port, [])[1:]] if BASELINE_PYTHON else []
    with_pusher = fastfan_command(port, ["--pusher-app", f"{PUSHER_APP_ID}:{PUSHER_KEY}:secret",
                                         "--api-port", str(api_port), "--api-key", API_KEY])
    return {
        "baseline": baseline,
        "yardstick": [str(build("yardstick")), str(port)],
        "fastfan": fastfan_command(port, []),
        # two workers on the one server core: what crossing the embedded bus costs
        "fastfan-2w": fastfan_command(port, ["--workers", "2"]),
        "fastfan-api": with_pusher,
        "fastfan-pusher": with_pusher,
        "uws": ["node", str(PEERS / "uws.js"), str(port)],
        "seed": ["node", str(PEERS / "seed.js"), str(port)],
        "websockets": [sys.executable, str(PEERS / "websockets_peer.py"), str(port)],
        "socketio": ["node", str(PEERS / "socketio.js"), str(port)],
    }


def install_peers() -> None:
    wanted = json.loads((PEERS / "package.json").read_text())["dependencies"]
    if not all((PEERS / "node_modules" / dep).exists() for dep in wanted):
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund"], cwd=PEERS,
                       check=True)


class Running:
    """One server process, pinned to the server CPU, its output in a log file."""

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.api_port = free_port()
        self.log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the process's life
        self.process = subprocess.Popen(server_commands(self.port, self.api_port)[name],
                                        stdout=self.log,
                                        stderr=subprocess.STDOUT, preexec_fn=pinned(SERVER_CPU))
        wait_listening(self.port, self.process)
        time.sleep(0.3)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def subscribers_and_publisher(server: Running) -> tuple[str, list[str]]:
    """The channel and the load generator's options for `server`'s subscribers and
    publisher (fastfan-api and fastfan-pusher: through the server API, as Pusher events)."""
    channel = f"bench{time.time_ns()}"
    api = [*API_PUBLISH, "--api-port", str(server.api_port)]
    if server.name == "fastfan-api":
        return f"pusher.{PUSHER_APP_ID}.{channel}", api
    if server.name == "fastfan-pusher":
        return channel, [*api, "--protocol", "pusher", "--publish-prefix",
                         f"pusher.{PUSHER_APP_ID}.",
                         "--path", f"/app/{PUSHER_KEY}?protocol=7&client=js&version=8.4.0"]
    return channel, protocol_args(server.name)


def measure(server: Running, scenario: Scenario, offered: float,
            duration: float) -> dict[str, Any]:
    channel, extra = subscribers_and_publisher(server)
    row = run_loadgen_measuring(
        server.process.pid, server.port, subs=scenario.subs, size=scenario.size,
        channels=scenario.channels, channel=channel,
        extra=["--per-conn", str(scenario.per_conn), *extra],
        rate=offered * scenario.channels / scenario.subs / scenario.per_conn,
        duration=duration)
    row["cpu_us_per_delivery"] = round(1e6 * row.pop("server_cpu_s") / max(row["delivered"], 1),
                                       3)
    row["server"], row["scenario"], row["crashed"] = server.name, scenario.name, not server.alive()
    if not row["crashed"]:  # the server and its workers, right after the run
        row["rss_mib"] = round(rss_bytes(server.process.pid) / 2**20, 1)
    return row


def saturated(row: dict[str, Any]) -> bool:
    return (row["delivered_per_s"] < 0.5 * row["offered_per_s"]
            or row["lost"] > 0.01 * max(row["expected"], 1) or row["crashed"])


def measure_repeated(server: Running, scenario: Scenario, offered: float, duration: float,
                     repeat: int) -> dict[str, Any]:
    """`repeat` runs at one rate: the one of median p99 (p99 over a few seconds varies by
    half from run to run here), or the worst one if any lost messages or crashed."""
    runs = [measure(server, scenario, offered, duration) for _ in range(repeat)]
    failed = [r for r in runs if saturated(r)]
    row = (min(failed, key=lambda r: r["delivered_per_s"]) if failed
           else sorted(runs, key=lambda r: r["p99_ms"])[len(runs) // 2])
    if repeat > 1:
        row = {**row, "runs": repeat, "p99_ms_runs": [r["p99_ms"] for r in runs],
               "delivered_per_s_runs": [r["delivered_per_s"] for r in runs]}
    return row


def run_scenario(scenario: Scenario, servers: list[str], duration: float,
                 log_dir: Path, repeat: int = 1) -> list[dict[str, Any]]:
    rows = []
    print(f"\n{scenario.name}: {scenario.subs} subscribers, {scenario.channels} channel(s), "
          f"{scenario.size}-byte data, {duration:g} s per rate"
          + (f", the median of {repeat} runs by p99" if repeat > 1 else ""))
    print(f"{'server':>10} {HEADER}")
    for name in servers:
        server = Running(name, log_dir)
        try:
            for offered in scenario.rates:
                try:
                    row = measure_repeated(server, scenario, offered, duration, repeat)
                except RuntimeError as failure:  # the load generator lost the server
                    row = {"server": name, "scenario": scenario.name, "offered_per_s": offered,
                           "error": str(failure), "crashed": not server.alive()}
                    rows.append(row)
                    print(f"{name:>10} {offered:>10.0f}  failed: {failure}", flush=True)
                    break
                rows.append(row)
                print(f"{name:>10} {format_row(row)}", flush=True)
                if saturated(row):
                    break
        finally:
            server.stop()
    return rows


def idle_memory(servers: list[str], log_dir: Path) -> list[dict[str, Any]]:
    print(f"\nidle: RSS per subscribed idle connection, {IDLE_CONNECTIONS} connections")
    rows = []
    for name in servers:
        server = Running(name, log_dir)
        try:
            before = rss_bytes(server.process.pid)
            with Subscribers([server.port], subs=IDLE_CONNECTIONS, channel="idle",
                             extra=protocol_args(name), pin=True) as clients:
                clients.ready()
                time.sleep(1)
                loaded = rss_bytes(server.process.pid)
                clients.go()
                clients.reports(timeout=60)
        finally:
            server.stop()
        row = {"server": name, "scenario": "idle", "connections": IDLE_CONNECTIONS,
               "rss_per_connection_kib": round((loaded - before) / IDLE_CONNECTIONS / 1024, 2)}
        rows.append(row)
        print(f"{name:>10} {row['rss_per_connection_kib']:>8.2f} KiB", flush=True)
    return rows


def loadgen_headroom(duration: float, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the load generator itself can receive: from benchmarks/firehose.c, which sends
    pre-framed batches (one send per 64 messages, nothing per message), on the server's CPU;
    with the fan-out scenario's 100-byte data and the large scenario's 16 KiB."""
    print("\nheadroom: the load generator receiving from the firehose, 1000 subscribers")
    measured = []
    for scenario in (SCENARIOS["fanout"], SCENARIOS["large"]):
        port = free_port()
        firehose = subprocess.Popen([str(build("firehose")), str(port), "1000", str(duration),
                                     "64", str(scenario.size)],
                                    stdout=subprocess.PIPE, text=True,
                                    preexec_fn=pinned(SERVER_CPU))
        time.sleep(0.2)
        received = run_loadgen(port, subs=1000, rate=0, duration=duration, channel="bench",
                               extra=["--drain", "1"])
        sent = json.loads(firehose.communicate(timeout=60)[0])
        fastest = max((r["delivered_per_s"] for r in rows
                       if r["scenario"] == scenario.name and "delivered_per_s" in r), default=0)
        row = {"server": "firehose", "scenario": "headroom", **received, "size": scenario.size,
               "firehose_sent_per_s": sent["sent_per_s"], "fastest_server_per_s": fastest,
               "headroom": round(received["delivered_per_s"] / fastest, 2) if fastest else None}
        print(f"{scenario.size:>6}-byte data: loadgen received "
              f"{received['delivered_per_s'] / 1e6:.3f}M/s (busy {received['busy']:.2f}, lost "
              f"{received['lost']}, reordered {received['reordered']})"
              + (f": {row['headroom']}x the fastest server's {fastest / 1e6:.3f}M/s in the "
                 f"{scenario.name} scenario of this run" if fastest else ""), flush=True)
        measured.append(row)
    return measured


def plot(rows: list[dict[str, Any]], scenario: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (delivered, p99) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["server"] for r in rows if r["scenario"] == scenario):
        mine = [r for r in rows if r["scenario"] == scenario and r["server"] == name
                and "delivered_per_s" in r]
        offered = [r["offered_per_s"] for r in mine]
        delivered.plot(offered, [r["delivered_per_s"] for r in mine], "o-", label=name)
        p99.plot(offered, [r["p99_ms"] for r in mine], "o-", label=name)
    for axis, label in ((delivered, "delivered / s"), (p99, "p99 latency, ms")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("offered deliveries / s")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"{scenario}: server on one core, load generator on the other")
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    plt.close(figure)


SUITE = ("fanout", "channels", "large", "headroom", "idle", "workers", "fanout-pusher", "redis")
REDIS_RATES = (50e3, 200e3, 500e3, 1e6)
SUITE_DURATION = 5.0  # seconds per rate when --duration is not given
# Study -> (its function in studies/, the options of this command line it takes)
STUDIES: dict[str, tuple[Callable[..., list[dict[str, Any]]], tuple[str, ...]]] = {
    "connections": (connections, ("connections", "workers", "processes", "duration")),
    "churn": (churn, ("cycles", "processes")),
    "storm": (storm, ("connections", "processes", "workers")),
    "slow-consumer": (slow_consumer, ("policy", "duration")),
    "soak": (soak, ("minutes",)),
    "accept-spread": (accept_spread, ("workers", "connections")),
    "presence": (presence, ("connections", "processes")),
    "join-storm": (join_storm, ("watchers", "joiners")),
    "api": (api, ("subscribers", "duration")),
    "shards": (shards, ("rates", "duration", "channels")),
    "wire": (wire, ("subscribers", "duration")),
    "history": (history, ("rates", "duration", "connections", "processes", "repeat")),
    "redis-channels": (redis_channels, ("servers", "rates", "duration", "baseline")),
    "connect-hooks": (connect_hooks, ("connections", "processes")),
    "hooks": (hooks, ("duration", "repeat")),
    "overload": (overload, ("servers", "rates", "duration")),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="yardstick,fastfan,uws,seed,websockets,socketio")
    parser.add_argument("--scenarios", default=",".join(SUITE),
                        help=f"any of {', '.join([*SUITE, *STUDIES])} (default: the suite)")
    parser.add_argument("--duration", type=float,
                        help=f"seconds per rate (default {SUITE_DURATION:g}); in connections, "
                             "seconds of publishing (3); in slow-consumer, seconds per run (8); in "
                             "api, seconds per run (3); in history, seconds per rate and per "
                             "publish-rate run (3)")
    parser.add_argument("--rates", help="offered deliveries/s, comma-separated, instead of the "
                                        "scenario's own (fanout, channels, large, workers, "
                                        "redis; in history, both its sweeps)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per rate in fanout, channels, large and workers; the table "
                             "shows the run of median p99 (history: every run, off and on "
                             "in turn)")
    parser.add_argument("--fastfan-args", default="",
                        help='extra `fastfan run` options, e.g. "--workers 2"')
    parser.add_argument("--baseline", metavar="PYTHON",
                        help='the server "baseline": fastfan run by this interpreter (another '
                             "checkout's .venv/bin/python), to compare before and after")
    parser.add_argument("--quick", action="store_true",
                        help="one light load per server; exit 1 on a crash or any loss")
    study = parser.add_argument_group("studies (each has its own defaults)")
    study.add_argument("--connections", type=int,
                       help="connections (10000), storm (10000), accept-spread (6000), "
                            "history's reconnect storm (10000)")
    study.add_argument("--workers", type=int,
                       help="fastfan's --workers in connections and storm (1); forked "
                            "acceptors in accept-spread (6)")
    study.add_argument("--processes", type=int,
                       help="client processes in connections (1), storm (20), churn (4), "
                            "history's storm (5)")
    study.add_argument("--cycles", type=int, help="churn: connect-subscribe-leave cycles "
                                                  "(100000)")
    study.add_argument("--policy", choices=("disconnect", "drop", "conflate"),
                       help="slow-consumer: fastfan's --slow-consumer (disconnect)")
    study.add_argument("--minutes", type=float, help="soak: how long (10)")
    study.add_argument("--channels", type=int,
                       help="shards: channels, each with a subscriber on both nodes (1000)")
    study.add_argument("--subscribers", type=int,
                       help="api: subscribers of the channel published into (1000); "
                            "wire: subscribers (500)")
    study.add_argument("--watchers", type=int,
                       help="join-storm: subscribers watching joinLeave (1000)")
    study.add_argument("--joiners", type=int,
                       help="join-storm: clients subscribing at once (1000)")
    args = parser.parse_args()
    unknown = set(args.scenarios.split(",")) - {*SUITE, *STUDIES}
    if unknown:
        parser.error(f"no scenario {', '.join(sorted(unknown))}: "
                     f"choose from {', '.join([*SUITE, *STUDIES])}")
    return args


def main() -> int:
    args = parse_args()
    servers = args.servers.split(",")
    scenarios = args.scenarios.split(",")
    duration = args.duration if args.duration is not None else SUITE_DURATION
    rates = tuple(float(r) for r in args.rates.split(",")) if args.rates else None
    lib.FASTFAN_ARGS.extend(args.fastfan_args.split())
    if args.baseline:
        BASELINE_PYTHON.append(args.baseline)
    if args.quick or any(name in SUITE for name in scenarios):
        install_peers()
    build_loadgen()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS / f"suite-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)

    if args.quick:
        rows = run_scenario(QUICK, servers, 2.0, log_dir)
        failed = [r for r in rows if r.get("crashed") or r.get("lost", 1) or "error" in r]
        (log_dir / "quick.json").write_text(json.dumps(rows, indent=2))
        print(f"\n{len(rows)} runs, {len(failed)} with a crash or loss")
        return 1 if failed or len(rows) != len(servers) else 0

    rows = []
    for name in scenarios:
        if name in STUDIES:
            function, options = STUDIES[name]
            given = {o: getattr(args, o) for o in options if getattr(args, o) is not None}
            rows += function(**given)
            continue
        if name == "idle":
            rows += idle_memory(servers, log_dir)
            continue
        if name == "headroom":
            rows += loadgen_headroom(duration, rows)
            continue
        if name == "redis":
            rows += redis(servers, list(rates or REDIS_RATES), duration)
            plot(rows, name, log_dir / f"{name}.png")
            continue
        if name == "workers":  # the fan-out sweep, one worker against two on one core
            scenario = replace(SCENARIOS["fanout"], name="workers")
            names = ["fastfan", "fastfan-2w"]
        elif name == "fanout-pusher":  # the fan-out sweep, Pusher's subscribers and fastfan's
            scenario = replace(SCENARIOS["fanout"], name="fanout-pusher")
            names = list(FANOUT_PUSHER)
        else:
            scenario, names = SCENARIOS[name], servers
        rows += run_scenario(replace(scenario, rates=rates or scenario.rates), names, duration,
                             log_dir, args.repeat)
        plot(rows, name, log_dir / f"{name}.png")
    (log_dir / "suite.json").write_text(json.dumps(rows, indent=2))
    print(f"\nJSON and plots in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
