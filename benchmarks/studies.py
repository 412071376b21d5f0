"""Studies: questions one rate sweep does not answer, each a scenario of run.py.

    ./dev bench --scenarios connections --connections 100000 --workers 6 --processes 6
    ./dev bench --scenarios churn                       # 100,000 connect-subscribe-leave cycles
    ./dev bench --scenarios storm --connections 10000 --processes 20
    ./dev bench --scenarios slow-consumer --policy drop
    ./dev bench --scenarios soak --minutes 10
    ./dev bench --scenarios accept-spread --workers 6 --connections 6000
    ./dev bench --scenarios presence --connections 10000 --processes 10
    ./dev bench --scenarios join-storm --watchers 1000 --joiners 1000
    ./dev bench --scenarios redis --rates 50000,200000,500000 --duration 4
    ./dev bench --scenarios api --subscribers 1000 --duration 3
    ./dev bench --scenarios shards --rates 10000,20000,40000,80000 --duration 4
    ./dev bench --scenarios wire --subscribers 500 --duration 3
    ./dev bench --scenarios history --duration 3 --connections 10000 --processes 5

Each function takes its options as keywords (run.py passes those given on its command
line; the defaults are here), prints what it measured, and returns it as rows for the
run's JSON. docs/benchmarks.md has the figures of their last runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from lib import (
    HEADER,
    PEERS,
    SERVER_CPU,
    TESTS,
    Subscribers,
    cpu_seconds,
    fastfan_command,
    format_row,
    free_port,
    metrics,
    pinned,
    protocol_args,
    rss_bytes,
    run_loadgen,
    start_fastfan,
    subscriber,
    wait_listening,
)

# Heartbeats far apart: idle clients that never answer a ping stay connected.
NO_HEARTBEAT = ["--ping-interval", "600", "--ping-timeout", "1200"]


def stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    server.wait(60)


def connections(connections: int = 10_000, workers: int = 1, processes: int = 1,
                duration: float = 3.0) -> list[dict[str, Any]]:
    """Many connections: connect rate, server RSS per idle connection, delivery to all.

    Subscribers come from several load generator processes (a process holds at most
    ~20,000 sockets here), each from its own 127.0.0.x (one source address reaches one
    port with ~28,000). Once all are subscribed and idle, the server's RSS (master and
    workers) is compared with its RSS before they came; then one publisher sends 10
    messages/s for `duration` s to all of them.
    """
    port = free_port()
    server = start_fastfan(port, ["--workers", str(workers), *NO_HEARTBEAT], pin=False)
    share = connections // processes
    total = share * processes
    try:
        time.sleep(1)
        baseline = rss_bytes(server.pid)
        started = time.monotonic()
        with Subscribers([port] * processes, subs=share, channel="all", duration=duration,
                         drain=3, sources=[f"127.0.0.{2 + k}" for k in range(processes)]) as subs:
            subs.ready()
            connect_s = time.monotonic() - started
            time.sleep(1)
            loaded = rss_bytes(server.pid)
            subs.go()
            sent = run_loadgen(port, subs=0, rate=10, duration=duration, channel="all",
                               pin=False, extra=["--drain", "0"])["sent"]
            reports = subs.reports()
    finally:
        stop(server)
    delivered = sum(r["delivered"] for r in reports)
    row = {
        "scenario": "connections", "connections": total, "workers": workers,
        "processes": processes, "connect_s": round(connect_s, 2),
        "connects_per_s": round(total / connect_s),
        "rss_before_mb": round(baseline / 2**20, 1), "rss_loaded_mb": round(loaded / 2**20, 1),
        "rss_per_connection_kib": round((loaded - baseline) / total / 1024, 2),
        "sent": sent, "expected": sent * total, "delivered": delivered,
        "lost": sent * total - delivered,
        "p99_ms_worst_process": max(r["p99_ms"] for r in reports),
    }
    print(f"\nconnections: {row}", flush=True)
    return [row]


def _churn_cycles(port: int, first: int, count: int) -> None:
    """Connect, subscribe to a channel of its own, publish, receive it, leave; `count` times."""
    for n in range(first, first + count):
        client = subscriber(port, f"churn-{n}", timeout=10, source=f"127.0.0.{2 + n % 8}")
        client.send_json({"type": "publish", "channel": f"churn-{n}", "data": n})
        client.recv_json()
        client.close()


def _in_processes(port: int, start: int, total: int, processes: int) -> None:
    share = total // processes
    clients = [multiprocessing.Process(target=_churn_cycles, args=(port, start + k * share, share))
               for k in range(processes)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
        if client.exitcode:
            raise RuntimeError(f"a client process failed ({client.exitcode})")


def churn(cycles: int = 100_000, processes: int = 4) -> list[dict[str, Any]]:
    """Connect, subscribe, receive, disconnect, `cycles` times: does memory come back?

    The server's RSS after the first 10,000 cycles (or half, for fewer) and after all of
    them, and its channel, subscription and connection counts at the end (all should be
    0). Each cycle uses a channel of its own, so a channel table that forgot to drop
    entries would show. Sources rotate over 127.0.0.2-9: closed connections wait in
    TIME_WAIT for 60 s.
    """
    port = free_port()
    server = start_fastfan(port, NO_HEARTBEAT, pin=False)
    first = min(10_000, cycles // 2)
    try:
        started = time.monotonic()
        _in_processes(port, 0, first, processes)
        time.sleep(2)  # one heartbeat sweep: idle buffers released
        after_first = rss_bytes(server.pid)
        _in_processes(port, first, cycles - first, processes)
        time.sleep(2)
        after_all = rss_bytes(server.pid)
        figures = metrics(port)
        elapsed = time.monotonic() - started
    finally:
        stop(server)
    row = {
        "scenario": "churn", "cycles": cycles, "seconds": round(elapsed, 1),
        "cycles_per_s": round(cycles / elapsed), "first_cycles": first,
        "rss_after_first_mb": round(after_first / 2**20, 2),
        "rss_after_all_mb": round(after_all / 2**20, 2),
        "growth_kib": round((after_all - after_first) / 1024),
        "connections": figures["fastfan_connections"],
        "channels": figures["fastfan_channels"],
        "subscriptions": figures["fastfan_subscriptions"],
        "connections_total": figures["fastfan_connections_total"],
    }
    print(f"\nchurn: {row}", flush=True)
    return [row]


def storm(connections: int = 10_000, processes: int = 20, workers: int = 1) -> list[dict[str, Any]]:
    """A reconnect storm: `connections` clients connecting at the same moment, as after a
    restart, from `processes` load generators started at once. How long until every one
    was welcomed and subscribed."""
    port = free_port()
    server = start_fastfan(port, ["--workers", str(workers)], pin=False)
    share = connections // processes
    try:
        started = time.monotonic()
        with Subscribers([port] * processes, subs=share, channel="storm",
                         sources=[f"127.0.0.{2 + k % 200}" for k in range(processes)]) as subs:
            subs.ready()
            elapsed = time.monotonic() - started
            subs.go()
            subs.reports(timeout=60)
    finally:
        stop(server)
    total = share * processes
    row = {"scenario": "storm", "clients": total, "processes": processes, "workers": workers,
           "all_served_s": round(elapsed, 2), "connects_per_s": round(total / elapsed)}
    print(f"\nstorm: {row}", flush=True)
    return [row]


SLOW_CONSUMER_COUNTERS = ("fastfan_slow_consumers_disconnected_total",
                          'fastfan_dropped_total{reason="slow_consumer"}',
                          'fastfan_dropped_total{reason="conflated"}')


def slow_consumer(policy: str = "disconnect", duration: float = 8.0) -> list[dict[str, Any]]:
    """Does one stalled client hurt the others? 1000 fast subscribers (the load
    generator) receive 8 KB messages at 100k deliveries/s with `--max-buffer` 1 MiB and
    the slow-consumer `policy`; in the second run one more subscriber, with the smallest
    receive window, never reads. The fast subscribers' rate, loss and p99, the server's
    RSS growth, and the policy's counters, for both runs."""
    rows = []
    print(f"\nslow-consumer, policy {policy}:")
    for stalled in (False, True):
        port = free_port()
        server = start_fastfan(port, ["--max-buffer", str(1 << 20), "--slow-consumer", policy])
        try:
            # held to the end of the run, never read from
            never_reads = subscriber(port, "stall", receive_buffer=4096) if stalled else None
            before = rss_bytes(server.pid)
            row = run_loadgen(port, subs=1000, rate=100, size=8000, duration=duration,
                              channel="stall")
            grown = (rss_bytes(server.pid) - before) / 2**20
            figures = metrics(port)
        finally:
            stop(server)
        if never_reads is not None:
            never_reads.close()
        counters = {name: figures.get(name, 0) for name in SLOW_CONSUMER_COUNTERS}
        rows.append({"scenario": "slow-consumer", "policy": policy, "stalled": stalled, **row,
                     "rss_growth_mb": round(grown, 1), **counters})
        print(f"{'one client stalled' if stalled else 'no client stalled'}: "
              f"delivered {row['delivered_per_s']:.0f}/s, lost {row['lost']}, "
              f"p99 {row['p99_ms']:.1f} ms, RSS +{grown:.1f} MB, {counters}", flush=True)
    return rows


def _join_and_leave(port: int, channel: str, stop_at: float) -> None:
    n = 0
    while time.monotonic() < stop_at:
        client = subscriber(port, channel, timeout=10, source=f"127.0.0.{2 + n % 8}")
        time.sleep(0.01)  # it may get a few messages before it leaves
        client.close()
        n += 1


def soak(minutes: float = 10.0) -> list[dict[str, Any]]:
    """Steady fan-out for minutes while other subscribers keep joining and leaving.

    One server (CPU 0). Rounds of 20 s (shorter when `minutes` is small): the load
    generator (CPU 1) connects 1000 fresh subscribers, publishes at 200k deliveries/s,
    checks loss and order, and leaves; meanwhile a process connects, subscribes to the
    same channel and disconnects, all the time. Loss, p99 and the server's RSS per round
    should all stay flat.
    """
    total = minutes * 60
    round_seconds = min(20.0, total / 2)
    port = free_port()
    server = start_fastfan(port, [])
    stop_at = time.monotonic() + total
    churner = multiprocessing.Process(target=_join_and_leave, args=(port, "soak", stop_at + 60))
    churner.start()
    rows: list[dict[str, Any]] = []
    try:
        print(f"\nsoak: rounds of {round_seconds:g} s\n{'round':>5} {'lost':>6} {'p99 ms':>8} "
              f"{'RSS MB':>8}")
        while time.monotonic() + round_seconds < stop_at:
            row = run_loadgen(port, subs=1000, rate=200, duration=round_seconds, channel="soak")
            rows.append({"scenario": "soak", "round": len(rows) + 1, **row,
                         "rss_mib": round(rss_bytes(server.pid) / 2**20, 1)})
            print(f"{len(rows):>5} {row['lost']:>6} {row['p99_ms']:>8.2f} "
                  f"{rows[-1]['rss_mib']:>8.1f}", flush=True)
    finally:
        churner.terminate()
        stop(server)
    p99s = [r["p99_ms"] for r in rows]
    print(f"{len(rows)} rounds: lost {sum(r['lost'] for r in rows)}, p99 {min(p99s):.1f}.."
          f"{max(p99s):.1f} ms, RSS {rows[0]['rss_mib']:.1f} -> {rows[-1]['rss_mib']:.1f} MB")
    return rows


def _count_accepts(sock: socket.socket | None, port: int, counter_fd: int) -> None:
    """A forked worker: accept connections, count them, write the count when told to stop."""
    import uvloop

    accepted = 0

    class Count(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            nonlocal accepted
            accepted += 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        if sock is not None:
            server = await loop.create_server(Count, sock=sock)
        else:
            server = await loop.create_server(Count, "127.0.0.1", port, reuse_port=True,
                                              backlog=4096)
        async with server:
            await stopped.wait()
        os.write(counter_fd, f"{accepted}\n".encode())

    uvloop.run(main())


def _spread(shared: bool, workers: int, connections: int) -> list[int]:
    port = free_port()
    sock = None
    if shared:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(4096)
    read_end, write_end = os.pipe()
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _count_accepts(sock, port, write_end)
            os._exit(0)
        pids.append(pid)
    os.close(write_end)
    time.sleep(1.0)
    clients = []
    for _ in range(connections):
        clients.append(socket.create_connection(("127.0.0.1", port)))
        if len(clients) % 200 == 0:
            time.sleep(0.01)  # arrivals spread in time, as real clients come
    time.sleep(1.0)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    for pid in pids:
        os.waitpid(pid, 0)
    with os.fdopen(read_end) as counts:
        result = sorted(int(line) for line in counts)
    for client in clients:
        client.close()
    return result


def accept_spread(workers: int = 6, connections: int = 6000) -> list[dict[str, Any]]:
    """How evenly do forked workers share incoming connections? A listening socket made
    before the fork and shared by all (each worker's uvloop polls it), against
    SO_REUSEPORT (each worker binds its own; the kernel hashes connections over them),
    which fastfan uses. Connections per worker for each."""
    rows = []
    print(f"\naccept-spread: {connections} connections over {workers} workers")
    for name, shared in (("shared socket", True), ("SO_REUSEPORT", False)):
        counts = _spread(shared, workers, connections)
        spread = (max(counts) - min(counts)) / (connections / workers)
        rows.append({"scenario": "accept-spread", "listener": name, "per_worker": counts})
        print(f"{name:>14}: per worker {counts}; max-min = {spread:.0%} of the mean", flush=True)
    return rows


# The Redis path ----------------------------------------------------------------------

REDIS_SERVERS = ("fastfan", "seed", "socketio")  # the servers with a Redis form


def _start_redis(port: int, workdir: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--dir", workdir],
                               stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    return process


def _split_run(ports: list[int], subs: int, offered: float, duration: float, channel: str,
               protocol: list[str]) -> dict[str, Any]:
    """Subscribers split over `ports`, one publisher on the first; one summary row."""
    share = subs // len(ports)
    with Subscribers(ports, subs=share, channel=channel, duration=duration, drain=2,
                     extra=protocol) as subscribers:
        subscribers.ready()
        time.sleep(0.5)  # let every node's SUBSCRIBE reach Redis
        subscribers.go()
        sent = run_loadgen(ports[0], subs=0, rate=offered / (share * len(ports)),
                           duration=duration, channel=channel, pin=False,
                           extra=["--drain", "0", *protocol])["sent"]
        reports = subscribers.reports(timeout=duration + 60)
    delivered = sum(r["delivered"] for r in reports)
    return {
        "offered_per_s": offered, "sent": sent,
        "delivered_per_s": sum(r["delivered_per_s"] for r in reports),
        "lost": sent * share * len(ports) - delivered,
        **{key: max(r[key] for r in reports) for key in ("p50_ms", "p99_ms", "p999_ms", "max_ms")},
    }


def _start_node(server: str, port: int, redis_port: int) -> subprocess.Popen[bytes]:
    """One node of `server` on `port`, publishing and subscribing through Redis."""
    if server == "fastfan":
        return start_fastfan(port, ["--redis", f"redis://127.0.0.1:{redis_port}/0"], pin=False)
    script = {"seed": "seed.js", "socketio": "socketio.js"}[server]
    node = subprocess.Popen(["node", str(PEERS / script), str(port), str(redis_port)])
    wait_listening(port, node)
    return node


def _through_redis(server: str, subs: int, rates: list[float],
                   duration: float) -> list[dict[str, Any]]:
    """Two nodes of `server` sharing one redis-server; half the subscribers on each."""
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        redis_port = free_port()
        redis_server = _start_redis(redis_port, workdir)
        nodes = [free_port(), free_port()]
        processes = [_start_node(server, port, redis_port) for port in nodes]
        try:
            print(f"\n{server} through Redis: two nodes, {subs} subscribers split over them"
                  f"\n{HEADER}")
            for n, offered in enumerate(rates):
                row = _split_run(nodes, subs, offered, duration, f"r{n}", protocol_args(server))
                rows.append({"server": f"{server}+redis", "scenario": "redis", **row})
                print(format_row(row), flush=True)
                if row["delivered_per_s"] < offered / 2:
                    break  # saturated: higher rates say nothing more
        finally:
            for process in processes:
                stop(process)
            redis_server.terminate()
            redis_server.wait(10)
    return rows


def _embedded(subs: int, rates: list[float], duration: float) -> list[dict[str, Any]]:
    """One fastfan with --workers 2 and no Redis: the embedded bus between the workers."""
    rows = []
    port = free_port()
    server = start_fastfan(port, ["--workers", "2"], pin=False)
    try:
        print(f"\nfastfan embedded: one node, --workers 2, {subs} subscribers\n{HEADER}")
        for n, offered in enumerate(rates):
            row = _split_run([port, port], subs, offered, duration, f"e{n}", [])
            rows.append({"server": "fastfan-2w", "scenario": "redis", **row})
            print(format_row(row), flush=True)
    finally:
        stop(server)
    return rows


def redis(servers: list[str], rates: list[float], duration: float,
          subs: int = 1000) -> list[dict[str, Any]]:
    """The Redis path against the embedded bus, same subscribers, same open-loop publisher.

    Through Redis: two nodes sharing one redis-server, half the subscribers on each, the
    publisher on the first, so every message crosses Redis: fastfan (--redis), the seed's
    design (Node ws + ioredis, as the article has it) and Socket.IO with its Redis adapter,
    those of them in `servers`. Embedded (when fastfan is in `servers`): one fastfan with
    --workers 2 and no Redis; the kernel spreads subscribers over both workers, so every
    message crosses the embedded bus to the other one. Nothing is pinned: two nodes,
    Redis and the load generators share both cores.
    """
    rows = []
    for server in (s for s in servers if s in REDIS_SERVERS):
        rows += _through_redis(server, subs, rates, duration)
    if "fastfan" in servers:
        rows += _embedded(subs, rates, duration)
    return rows


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
        redis_server = _start_redis(redis_port, workdir)
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


API_KEY = "benchmark-api-key"
IN_FLIGHT = 16  # requests ahead of their answers, in the pipelined runs


def _api_publish(seq: int) -> bytes:
    body = json.dumps({"channel": "crowd", "data": _data(seq)}).encode()
    return (b"POST /api/publish HTTP/1.1\r\nHost: bench\r\nAuthorization: apikey "
            + API_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def _ws_publish(seq: int) -> dict[str, Any]:
    return {"type": "publish", "channel": "crowd", "data": _data(seq), "id": seq}


def _data(seq: int) -> dict[str, Any]:
    """What loadgen's subscribers check: seq in order, ts for the latency (both clocks are
    CLOCK_MONOTONIC), about 100 bytes in all."""
    return {"seq": seq, "ts": time.monotonic_ns(), "pad": "x" * 48}


def _through_api(port: int, first: int, duration: float, in_flight: int) -> int:
    """Publishes through one keep-alive API connection for `duration` s, `in_flight` of
    them ahead of their answers; how many were answered 200."""
    answer = b'{"result":{}}'
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = answered = 0
        buffer = b""
        stop_at = time.monotonic() + duration
        while True:
            sending = time.monotonic() < stop_at
            if sending and sent - answered < in_flight:
                batch = in_flight - (sent - answered)
                sock.sendall(b"".join(_api_publish(first + sent + k)
                                      for k in range(batch)))
                sent += batch
            if answered == sent and not sending:
                return answered
            buffer += sock.recv(65536)
            if re.search(rb"HTTP/1\.1 (?!200)\d{3}", buffer):
                raise RuntimeError(f"the API refused a publish: {buffer[:300]!r}")
            done = buffer.count(answer)
            answered += done
            buffer = buffer[buffer.rfind(answer) + len(answer):] if done else buffer


def _through_websocket(port: int, first: int, duration: float, in_flight: int) -> int:
    """The same through one WebSocket connection: publishes with an `id`, `in_flight`
    ahead of their `published` replies; how many were answered."""
    client = subscriber(port, "none.publisher", timeout=30)
    sent = answered = 0
    stop_at = time.monotonic() + duration
    try:
        while True:
            sending = time.monotonic() < stop_at
            if sending and sent - answered < in_flight:
                batch = in_flight - (sent - answered)
                client.send_json_burst([_ws_publish(first + sent + k) for k in range(batch)])
                sent += batch
            if answered == sent and not sending:
                return answered
            reply = client.recv_json()
            if reply["type"] != "published":
                raise RuntimeError(f"a WebSocket publish failed: {reply}")
            answered += 1
    finally:
        client.close()


def api(subscribers: int = 1000, duration: float = 3.0) -> list[dict[str, Any]]:
    """Publishes/s into a channel of `subscribers` from one keep-alive server API client
    (HTTP/1.1, one request at a time, then IN_FLIGHT pipelined), against one WebSocket
    publisher doing the same (an `id` on each publish, waiting for `published`), one
    worker; with the server's CPU per publish and the deliveries each run made."""
    port, api_port = free_port(), free_port()
    server = start_fastfan(port, ["--api-port", str(api_port), "--api-key", API_KEY,
                                  *NO_HEARTBEAT])
    rows = []
    seq = 0
    try:
        with Subscribers([port], subs=subscribers, channel="crowd", duration=1,
                         drain=3) as subs:
            subs.ready()
            subs.go()
            runs = [("api", _through_api, api_port, 1),
                    ("api", _through_api, api_port, IN_FLIGHT),
                    ("websocket", _through_websocket, port, 1),
                    ("websocket", _through_websocket, port, IN_FLIGHT)]
            for via, publish, target, in_flight in runs:
                before, cpu_before = metrics(port), cpu_seconds(server.pid)
                started = time.monotonic()
                published = publish(target, seq, duration, in_flight)
                elapsed = time.monotonic() - started
                time.sleep(0.5)  # the last fan-outs are written
                after, cpu_after = metrics(port), cpu_seconds(server.pid)
                seq += published
                deliveries = (after["fastfan_deliveries_total"]
                              - before["fastfan_deliveries_total"])
                row = {"scenario": "api", "via": via, "in_flight": in_flight,
                       "subscribers": subscribers, "publishes": published,
                       "publishes_per_s": round(published / elapsed),
                       "deliveries_per_s": round(deliveries / elapsed),
                       "server_cpu_us_per_publish":
                           round((cpu_after - cpu_before) / published * 1e6, 1)}
                print(f"\napi: {row}", flush=True)
                rows.append(row)
            reports = subs.reports()
    finally:
        stop(server)
    delivered = sum(r["delivered"] for r in reports)
    for row in rows:
        row["lost_in_all_runs"] = seq * subscribers - delivered
    print(f"\napi: {seq} publishes in all, {seq * subscribers - delivered} deliveries lost",
          flush=True)
    return rows


# Past one Redis ------------------------------------------------------------------------

SHARD_TOPOLOGIES = ("one", "three", "cluster")


def _redis_cpu(processes: list[subprocess.Popen[bytes]]) -> float:
    return sum(cpu_seconds(process.pid) for process in processes)


def _start_topology(topology: str, workdir: str) -> tuple[list[subprocess.Popen[bytes]], str]:
    """The redis-servers of `topology` and fastfan's --redis for them: one, three
    standalone shards, or a cluster of three masters (no replicas: each message once)."""
    count = 1 if topology == "one" else 3
    ports = [free_port() for _ in range(count)]
    while topology == "cluster" and any(port > 55000 for port in ports):
        ports = [free_port() for _ in range(count)]  # each with its bus port, + 10000
    cluster = ["--cluster-enabled", "yes", "--cluster-config-file"] if topology == "cluster" \
        else []
    processes = [subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir,
         *([*cluster, f"nodes-{port}.conf"] if cluster else [])],
        stdout=subprocess.DEVNULL) for port in ports]
    time.sleep(0.3)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    if topology == "cluster":
        subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas",
                        "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        while b"cluster_state:ok" not in subprocess.run(
                ["redis-cli", "-p", str(ports[0]), "cluster", "info"], capture_output=True,
                check=True).stdout:
            time.sleep(0.1)
        return processes, "redis+cluster://" + ",".join(addresses)
    return processes, ",".join(f"redis://{address}/0" for address in addresses)


def _wait_ready(port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("fastfan not ready through Redis")


def shards(rates: str = "100000,200000,400000,600000", duration: float = 4.0,
           channels: int = 1000) -> list[dict[str, Any]]:
    """Deliveries/s through one Redis, three standalone shards (--redis URL1,URL2,URL3)
    and a Redis Cluster of three masters (redis+cluster://): two fastfan nodes, `channels`
    channels each with one subscriber on each node, one publisher on the first node going
    round-robin over the channels, so every message crosses Redis to both nodes. Redis's
    CPU (all its processes) per message published, and its busiest process's share of a
    core. Nothing is pinned: two nodes, Redis and the load generators share the cores.
    """
    rows = []
    for topology in SHARD_TOPOLOGIES:
        with tempfile.TemporaryDirectory() as workdir:
            redis_servers, url = _start_topology(topology, workdir)
            nodes = [free_port(), free_port()]
            processes = [start_fastfan(port, ["--redis", url], pin=False) for port in nodes]
            try:
                for port in nodes:
                    _wait_ready(port)
                print(f"\nfastfan through {topology} Redis: two nodes, {channels} channels"
                      f"\n{HEADER}  redis us/msg  busiest redis  node us/msg (publisher, "
                      f"other)", flush=True)
                for n, offered in enumerate(float(rate) for rate in rates.split(",")):
                    row = _channels_run(nodes, channels, offered, duration, f"s{n}",
                                        redis_servers, processes)
                    rows.append({"server": f"fastfan+{topology}", "scenario": "shards", **row})
                    print(f"{format_row(row)}  {row['redis_us_per_msg']:12.2f}"
                          f"  {row['redis_busiest_core']:12.0%}  "
                          f"{row['node_us_per_msg'][0]:8.1f} {row['node_us_per_msg'][1]:6.1f}",
                          flush=True)
            finally:
                for process in processes:
                    stop(process)
                for server in redis_servers:
                    server.terminate()
                    server.wait(10)
    return rows


def _channels_run(ports: list[int], channels: int, offered: float, duration: float,
                  channel: str, redis_servers: list[subprocess.Popen[bytes]],
                  nodes: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """`channels` subscribers on each of `ports`, one per channel; a publisher on the first
    at offered / len(ports) messages/s; one summary row, with Redis's CPU and the nodes'."""
    spread = ["--channels", str(channels)]
    with Subscribers(ports, subs=channels, channel=channel, duration=duration, drain=2,
                     extra=spread) as subscribers:
        subscribers.ready()
        time.sleep(0.5)  # let every node's SUBSCRIBE reach Redis
        cpu = [cpu_seconds(server.pid) for server in redis_servers]
        node_cpu = [cpu_seconds(node.pid) for node in nodes]
        started = time.monotonic()
        subscribers.go()
        sent = run_loadgen(ports[0], subs=0, rate=offered / len(ports), duration=duration,
                           channel=channel, channels=channels, pin=False,
                           extra=["--drain", "0"])["sent"]
        elapsed = time.monotonic() - started
        used = [cpu_seconds(server.pid) - before
                for server, before in zip(redis_servers, cpu, strict=True)]
        reports = subscribers.reports(timeout=duration + 60)
        node_used = [cpu_seconds(node.pid) - before
                     for node, before in zip(nodes, node_cpu, strict=True)]
    delivered = sum(r["delivered"] for r in reports)
    return {
        "offered_per_s": offered, "sent": sent,
        "delivered_per_s": sum(r["delivered_per_s"] for r in reports),
        "lost": sent * len(ports) - delivered,
        **{key: max(r[key] for r in reports) for key in ("p50_ms", "p99_ms", "p999_ms", "max_ms")},
        "redis_us_per_msg": sum(used) / max(sent, 1) * 1e6,
        "redis_busiest_core": max(used) / elapsed,
        "cpu_us_per_delivery": sum(node_used) / max(delivered, 1) * 1e6,
        "node_us_per_msg": [used_ / max(sent, 1) * 1e6 for used_ in node_used],
    }


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
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from wire import RawClient

    port = free_port()
    server = start_fastfan(port, NO_HEARTBEAT, pin=False)
    try:
        watching = []
        for _ in range(watchers):
            client = RawClient("127.0.0.1", port, "/", timeout=30)
            client.recv_json()  # welcome
            client.send_json({"type": "subscribe", "channel": "crowd", "joinLeave": True})
            while client.recv_json()["type"] != "subscribed":
                pass  # the joins of the watchers after it
            watching.append(client)
        joining = []
        for _ in range(joiners):
            client = RawClient("127.0.0.1", port, "/", timeout=30)
            client.recv_json()
            joining.append(client)
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


# The wire: what permessage-deflate and TLS cost --------------------------------------------

WIRE_MODES = {  # mode -> (TLS, offer permessage-deflate)
    "plain": (False, False), "deflate": (False, True),
    "tls": (True, False), "tls+deflate": (True, True),
}
_OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"


def _wire_data(seq: int, size: int) -> dict[str, Any]:
    """A chat-like message of about `size` bytes: words that repeat, numbers that do not."""
    words = ("price", "update", "order", "filled", "market", "limit", "buy", "sell", "book")
    text = " ".join(f"{words[(seq * 7 + i) % len(words)]}:{(seq * 31 + i * 17) % 10007}"
                    for i in range(size // 12))
    return {"seq": seq, "user": f"user{seq % 97}", "text": text[:size]}


def _wire_connect(port: int, tls: bool, deflate: bool) -> socket.socket:
    """A WebSocket connection on a bare (or TLS-wrapped) socket, its 101 read."""
    import ssl

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # a throwaway self-signed certificate
        sock = context.wrap_socket(sock)
    sock.sendall(("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  f"Sec-WebSocket-Version: 13\r\n{_OFFER if deflate else ''}\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    assert (b"permessage-deflate" in head) == deflate, head
    return sock


def _wire_frame(payload: bytes) -> bytes:
    """A masked client text frame (the zero key: the payload as it is)."""
    size = len(payload)
    if size < 126:
        return bytes([0x81, 0x80 | size]) + bytes(4) + payload
    head = bytes([0x81, 0xFE]) + size.to_bytes(2, "big")
    return head + bytes(4) + payload


def _wire_subscribers(port: int, count: int, tls: bool, deflate: bool, seconds: float,
                      ready: Any, result: Any) -> None:
    """`count` subscribers reading everything for `seconds` after `ready` is set: the bytes."""
    import selectors
    import ssl

    os.sched_setaffinity(0, {1})  # the load generator's CPU
    selector = selectors.DefaultSelector()
    for _ in range(count):
        sock = _wire_connect(port, tls, deflate)
        sock.sendall(_wire_frame(b'{"type":"subscribe","channel":"wire"}'))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    time.sleep(0.5)  # the subscribed replies are in
    for key, _ in selector.select(0):
        try:
            while key.fileobj.recv(1 << 18):  # type: ignore[union-attr]
                pass
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
    ready.set()
    received, stop_at = 0, time.monotonic() + seconds
    while time.monotonic() < stop_at:
        for key, _ in selector.select(0.1):
            try:
                while data := key.fileobj.recv(1 << 18):  # type: ignore[union-attr]
                    received += len(data)
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
    result.value = received


def wire(subscribers: int = 500, duration: float = 3.0, size: int = 1000,
         rate: float = 100) -> list[dict[str, Any]]:
    """What permessage-deflate and TLS cost: `subscribers` on one channel (Python clients on
    the load generator's CPU, reading everything) get `rate` messages/s of about `size`
    bytes of chat-like JSON, plain, all with permessage-deflate, over TLS, and both. The
    server's CPU per delivery and the bytes on the wire per delivery, against plain."""
    rows: list[dict[str, Any]] = []
    print(f"\nwire: {subscribers} subscribers, {rate:g} messages/s of ~{size} bytes, "
          f"{duration:g} s per mode")
    print(f"{'mode':>12} {'deliveries':>10} {'CPU us/deliv':>12} {'vs plain':>8} "
          f"{'wire B/deliv':>12} {'vs plain':>8}")
    with tempfile.TemporaryDirectory() as keys:
        cert, key = os.path.join(keys, "cert.pem"), os.path.join(keys, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=127.0.0.1"], check=True,
                       capture_output=True)
        for mode, (tls, deflate) in WIRE_MODES.items():
            port = free_port()
            server = subprocess.Popen(
                fastfan_command(port, ["--tls-cert", cert, "--tls-key", key] if tls else []),
                preexec_fn=pinned(SERVER_CPU))
            try:
                wait_listening(port, server)
                rows.append(_wire_run(mode, port, server.pid, subscribers, duration, size,
                                      rate, tls, deflate))
            finally:
                stop(server)
            plain = rows[0]
            row = rows[-1]
            row["cpu_vs_plain"] = round(row["cpu_us_per_delivery"]
                                        / plain["cpu_us_per_delivery"], 2)
            row["bytes_vs_plain"] = round(row["wire_bytes_per_delivery"]
                                          / plain["wire_bytes_per_delivery"], 2)
            print(f"{mode:>12} {row['deliveries']:>10} {row['cpu_us_per_delivery']:>12.3f} "
                  f"{row['cpu_vs_plain']:>8.2f} {row['wire_bytes_per_delivery']:>12.1f} "
                  f"{row['bytes_vs_plain']:>8.2f}", flush=True)
    return rows


def _wire_run(mode: str, port: int, pid: int, subscribers: int, duration: float, size: int,
              rate: float, tls: bool, deflate: bool) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    ready, received = context.Event(), context.Value("q", 0)
    reader = context.Process(target=_wire_subscribers, args=(
        port, subscribers, tls, deflate, duration + 2, ready, received))
    reader.start()
    publisher = _wire_connect(port, tls, False)
    if not ready.wait(60):
        reader.kill()
        raise RuntimeError("wire: the subscribers did not connect")
    frames = [_wire_frame(json.dumps({"type": "publish", "channel": "wire",
                                      "data": _wire_data(seq, size)}).encode())
              for seq in range(int(rate * duration))]
    before, started = cpu_seconds(pid), time.monotonic()
    for seq, frame in enumerate(frames):
        publisher.sendall(frame)
        time.sleep(max(0.0, started + (seq + 1) / rate - time.monotonic()))
    time.sleep(1)  # the last messages written
    used = cpu_seconds(pid) - before
    reader.join()
    publisher.close()
    deliveries = len(frames) * subscribers
    return {"scenario": "wire", "mode": mode, "subscribers": subscribers, "size": size,
            "deliveries": deliveries, "received_bytes": received.value,
            "cpu_us_per_delivery": round(1e6 * used / deliveries, 3),
            "wire_bytes_per_delivery": round(received.value / deliveries, 1)}


# History and recovery -----------------------------------------------------------------

HISTORY_KEPT = 100  # --history-size of the runs with history on
HISTORY_ON = ["--history-size", str(HISTORY_KEPT)]
EMBEDDED_HISTORY_RATES = "100000,500000,1000000"
REDIS_HISTORY_RATES = "50000,200000,500000"
PUBLISHED = b'"type":"published"'


def _frame(payload: bytes) -> bytes:
    """A client text frame masked with the zero key (the payload stays as it is)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from wire import TEXT, ZERO_KEY, frame_head

    return bytes(frame_head(TEXT, len(payload)) + ZERO_KEY + payload)


def _client(port: int) -> Any:
    """A tests/wire.py RawClient past its welcome, subscribed to nothing."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from wire import RawClient

    client = RawClient("127.0.0.1", port, "/", timeout=30)
    client.recv_json()  # welcome
    return client


def _publish_acked(port: int, channels: list[str], *, duration: float = 0, count: int = 0,
                   in_flight: int = 64) -> tuple[int, float]:
    """Publishes with an `id`, round-robin over `channels`, `in_flight` ahead of their
    `published` replies, for `duration` s or `count` publishes; 100-byte data. How many
    were acknowledged, in how many seconds."""
    client = _client(port)
    sock = client.sock
    sent = answered = 0
    tail = b""
    started = time.monotonic()
    stop_at = started + duration
    try:
        while True:
            sending = (sent < count) if count else time.monotonic() < stop_at
            if sending and sent - answered < in_flight:
                batch = in_flight - (sent - answered)
                if count:
                    batch = min(batch, count - sent)
                sock.sendall(b"".join(
                    _frame(b'{"type":"publish","channel":"%s","id":%d,"data":{"seq":%d,'
                           b'"pad":"%s"}}' % (channels[(sent + k) % len(channels)].encode(),
                                              sent + k, sent + k, b"x" * 76))
                    for k in range(batch)))
                sent += batch
            if answered == sent and not sending:
                return answered, time.monotonic() - started
            chunk = sock.recv(262144)
            if not chunk:
                raise RuntimeError("the server closed the publisher")
            if b'"type":"error"' in chunk:
                raise RuntimeError(f"a publish failed: {chunk[:300]!r}")
            data = tail + chunk
            answered += data.count(PUBLISHED)
            # a reply split across reads: keep what could be its start, never a whole one
            cut = max(len(data) - len(PUBLISHED) + 1, data.rfind(PUBLISHED) + len(PUBLISHED))
            tail = data[cut:]
    finally:
        client.close()


def _position(port: int, channel: str) -> tuple[int, str]:
    """A history channel's last offset and epoch, from a fresh subscription's reply."""
    client = _client(port)
    client.send_json({"type": "subscribe", "channel": channel})
    reply = client.recv_json()
    client.close()
    return int(reply["offset"]), str(reply["epoch"])


def _fanout_side_by_side(label: str, ports: dict[str, list[int]],
                         pids: dict[str, list[int]], rates: list[float],
                         duration: float, repeat: int) -> list[dict[str, Any]]:
    """The same open-loop run at each rate against the servers with history off and on, in
    turn (rate by rate, `repeat` times each, so drift hits both); subscribers split over
    each one's ports."""
    rows = []
    print(f"\nhistory, fan-out {label}: 1000 subscribers, 100-byte data, {duration:g} s per "
          f"rate\n{'history':>8} {HEADER}")
    for n, offered in enumerate(rates):
        for run, (kept, nodes) in enumerate(
                [pair for _ in range(repeat) for pair in ports.items()]):
            row = _fanout_run(nodes, pids[kept], offered, duration, f"f{kept}{n}.{run}")
            rows.append({"scenario": "history", "part": f"fanout {label}", "history": kept,
                         **row})
            print(f"{kept:>8} {format_row(row)}", flush=True)
    return rows


def _fanout_run(ports: list[int], pids: list[int], offered: float, duration: float,
                channel: str) -> dict[str, Any]:
    """1000 subscribers split over `ports`, one open-loop publisher on the first; the
    server's CPU (every process in `pids`) per delivery while publishing only, not while
    subscribing (a subscribe to a history channel reads its position). One server is
    pinned (subscribers and publisher on the load generator's CPU), nodes are not."""
    pin = len(ports) == 1
    share = 1000 // len(ports)
    with Subscribers(ports, subs=share, channel=channel, duration=duration, drain=2,
                     pin=pin) as subscribers:
        subscribers.ready()
        time.sleep(0.5)  # let every node's SUBSCRIBE reach Redis
        before = sum(cpu_seconds(pid) for pid in pids)
        subscribers.go()
        sent = run_loadgen(ports[0], subs=0, rate=offered / (share * len(ports)),
                           duration=duration, channel=channel, pin=pin,
                           extra=["--drain", "0"])["sent"]
        reports = subscribers.reports(timeout=duration + 60)
        used = sum(cpu_seconds(pid) for pid in pids) - before
    delivered = sum(r["delivered"] for r in reports)
    return {
        "offered_per_s": offered, "sent": sent,
        "delivered_per_s": sum(r["delivered_per_s"] for r in reports),
        "lost": sent * share * len(ports) - delivered,
        **{key: max(r[key] for r in reports) for key in ("p50_ms", "p99_ms", "p999_ms", "max_ms")},
        "cpu_us_per_delivery": round(1e6 * used / max(delivered, 1), 3),
    }


def _acked_rates(label: str, ports: dict[str, list[int]], pids: dict[str, list[int]],
                 duration: float, repeat: int, in_flight: int = 64) -> list[dict[str, Any]]:
    """Acknowledged publishes/s from one WebSocket publisher (ids, `in_flight` ahead)
    into a channel with no subscribers, history off against on, `repeat` times (at least
    twice) each, alternating; with the CPU per publish of the server (its nodes) and of
    Redis (the last of a `pids` list of more than one)."""
    rows = []
    for attempt in range(max(2, repeat)):
        for kept, nodes in ports.items():
            before = [cpu_seconds(pid) for pid in pids[kept]]
            acked, elapsed = _publish_acked(nodes[0], [f"p{kept}{attempt}"], duration=duration,
                                            in_flight=in_flight)
            used = [1e6 * (cpu_seconds(pid) - b) / max(acked, 1)
                    for pid, b in zip(pids[kept], before, strict=True)]
            row = {"scenario": "history", "part": f"publish {label}", "history": kept,
                   "in_flight": in_flight, "acked": acked,
                   "publishes_per_s": round(acked / elapsed),
                   "server_cpu_us_per_publish": round(sum(used[:-1] or used), 1)}
            if len(used) > 1:
                row["redis_cpu_us_per_publish"] = round(used[-1], 1)
            rows.append(row)
            print(f"history {kept:>3}, {label}: {row['publishes_per_s']} acknowledged "
                  f"publishes/s ({in_flight} in flight); CPU per publish: server "
                  f"{row['server_cpu_us_per_publish']} us"
                  + (f", Redis {row['redis_cpu_us_per_publish']} us" if len(used) > 1 else ""),
                  flush=True)
    return rows


async def _storm_clients(port: int, source: str, count: int, channel: str,
                         recover: dict[str, Any] | None, want: int,
                         held: list[asyncio.StreamWriter]) -> int:
    """`count` clients connect, subscribe (recovering from `recover`) and read until they
    have their `subscribed` and `want` messages; at most 100 connecting at once. How many
    failed (not recovered, or a message missing)."""
    request = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    ask: dict[str, Any] = {"type": "subscribe", "channel": channel}
    if recover is not None:
        ask["recover"] = recover
    subscribe = _frame(json.dumps(ask).encode())
    gate = asyncio.Semaphore(100)
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                           local_addr=(source, 0))
            held.append(writer)
            writer.write(request)
            await reader.readuntil(b'"welcome"')
        writer.write(subscribe)
        seen = b""
        while b'"subscribed"' not in seen or seen.count(b'"type":"message"') < want:
            chunk = await asyncio.wait_for(reader.read(65536), 120)
            if not chunk:
                raise RuntimeError("the server closed a recovering client")
            seen += chunk
        if recover is not None and b'"recovered":true' not in seen:
            failed += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return failed


def _storm_process(port: int, source: str, count: int, channel: str,
                   recover: dict[str, Any] | None, want: int, go: Any, out: Any) -> None:
    import uvloop

    held: list[asyncio.StreamWriter] = []

    async def main() -> tuple[float, int, float, str]:
        failed = await _storm_clients(port, source, count, channel, recover, want, held)
        done, cpu = time.monotonic(), time.process_time() - cpu_before
        await asyncio.sleep(1)  # held connected until every process is done
        return done, failed, cpu, ""

    go.wait()
    cpu_before = time.process_time()
    try:
        out.put(uvloop.run(main()))
    except Exception as exc:  # reported to the parent
        out.put((0.0, -1, 0.0, repr(exc)))


def _storm(port: int, pids: list[int], channel: str, recover: dict[str, Any] | None,
           want: int, clients: int, processes: int) -> dict[str, Any]:
    """`clients` over `processes` client processes, all let go at once: seconds until the
    last has its reply and messages, and the server's (and Redis's) CPU seconds."""
    context = multiprocessing.get_context("fork")
    go, out = context.Event(), context.Queue()
    share = clients // processes
    workers = [context.Process(target=_storm_process,
                               args=(port, f"127.0.0.{2 + k}", share, channel, recover, want,
                                     go, out))
               for k in range(processes)]
    for worker in workers:
        worker.start()
    time.sleep(1)
    before = [cpu_seconds(pid) for pid in pids]
    started = time.monotonic()
    go.set()
    results = [out.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(30)
    used = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
    broken = [r for r in results if r[1] < 0]
    if broken:
        raise RuntimeError(f"a storm client process failed: {broken[0][3]}")
    return {"clients": share * processes, "processes": processes,
            "all_served_s": round(max(r[0] for r in results) - started, 2),
            "not_recovered": sum(r[1] for r in results),
            "server_cpu_s": round(used[0], 2),
            **({"redis_cpu_s": round(used[1], 2)} if len(used) > 1 else {}),
            "clients_cpu_s": round(sum(r[2] for r in results), 2)}


def _storms(label: str, ports: dict[str, list[int]], pids: dict[str, list[int]], clients: int,
            processes: int) -> list[dict[str, Any]]:
    """The storm with recovery of 100 messages against the same storm subscribing plainly,
    and subscribing plainly to a server without history."""
    channel = f"storm.{label}"
    _publish_acked(ports["on"][0], [channel], count=HISTORY_KEPT + 50)
    top, epoch = _position(ports["on"][0], channel)
    rows = []
    for kept, kind, recover, want in (
            ("off", "subscribe", None, 0), ("on", "subscribe", None, 0),
            ("on", "recover 100", {"offset": top - 100, "epoch": epoch}, 100)):
        row = {"scenario": "history", "part": f"storm {label}", "history": kept, "storm": kind,
               **_storm(ports[kept][0], pids[kept], channel, recover, want, clients,
                        processes)}
        rows.append(row)
        print(f"storm {label}, history {kept}, {kind}: {row}", flush=True)
        time.sleep(2)  # the storm's connections closed before the next
    return rows


def _kept_size(port: int, channel: str) -> int:
    """The bytes of a history channel's last message, as kept and sent (numbered)."""
    top, epoch = _position(port, channel)
    client = _client(port)
    client.send_json({"type": "subscribe", "channel": channel,
                      "recover": {"offset": top - 1, "epoch": epoch}})
    client.recv_json()  # subscribed
    _, _, payload = client.recv_frame()
    client.close()
    return len(payload)


def _redis_used_memory(port: int) -> int:
    out = subprocess.run(["redis-cli", "-p", str(port), "info", "memory"], capture_output=True,
                         text=True, check=True).stdout
    return int(re.search(r"^used_memory:(\d+)", out, re.M).group(1))  # type: ignore[union-attr]


def _memory(redis_port: int) -> list[dict[str, Any]]:
    """1000 channels x 100 kept messages of 100-byte data: the worker's RSS growth with
    history against without (embedded), and Redis's used_memory growth (--redis)."""
    channels = [f"mem.{k}" for k in range(1000)]
    count = len(channels) * HISTORY_KEPT
    grown = {}
    for kept, extra in (("off", []), ("on", HISTORY_ON)):
        port = free_port()
        server = start_fastfan(port, [*extra, *NO_HEARTBEAT])
        try:
            time.sleep(0.5)
            before = rss_bytes(server.pid)
            _publish_acked(port, channels, count=count)
            time.sleep(0.5)
            grown[kept] = rss_bytes(server.pid) - before
            if kept == "on":
                message_bytes = _kept_size(port, channels[0])
        finally:
            stop(server)
    port = free_port()
    server = start_fastfan(port, ["--redis", f"redis://127.0.0.1:{redis_port}/0", *HISTORY_ON],
                           pin=False)
    try:
        _wait_ready(port)
        before = _redis_used_memory(redis_port)
        _publish_acked(port, channels, count=count)
        redis_grown = _redis_used_memory(redis_port) - before
    finally:
        stop(server)
    row = {"scenario": "history", "part": "memory", "channels": len(channels),
           "kept_per_channel": HISTORY_KEPT, "data_bytes": 100,
           "message_bytes": message_bytes,
           "rss_growth_off_mib": round(grown["off"] / 2**20, 1),
           "rss_growth_on_mib": round(grown["on"] / 2**20, 1),
           "embedded_bytes_per_message": round((grown["on"] - grown["off"]) / count),
           "redis_used_memory_growth_mib": round(redis_grown / 2**20, 1),
           "redis_bytes_per_message": round(redis_grown / count)}
    print(f"\nhistory memory: {row}", flush=True)
    return [row]


def history(rates: str | None = None, duration: float = 3.0, connections: int = 10_000,
            processes: int = 5, repeat: int = 1) -> list[dict[str, Any]]:
    """History and recovery (--history-size 100) against none, side by side in one run.

    1. Fan-out, the same open-loop load generator run against a server with history off
       and one with it on, rate by rate: (a) embedded, one worker pinned to CPU 0, 1000
       subscribers; (b) two nodes (--redis) through one redis-server, half the
       subscribers on each, nothing pinned; delivered/s, loss, p99, server CPU per
       delivery while publishing (with Redis's, in (b)). Then the acknowledged
       publishes/s of one WebSocket publisher (ids, 64 in flight) into a channel without
       subscribers: the embedded sequencer, and Redis's PUBLISH against the numbering
       script.
    2. A reconnect storm: `connections` clients from `processes` client processes (asyncio,
       127.0.0.x sources), all at once, subscribing to a channel with 150 messages
       published, recovering from 100 back (so 100 messages each), against the same storm
       subscribing plainly, and against it subscribing plainly to a server without
       history: seconds until the last has all it wants, server CPU seconds. Embedded
       (one worker) and one --redis node (and redis-server's CPU).
    3. Memory: 1000 channels x 100 kept messages of 100-byte data; worker RSS growth with
       history against without, Redis used_memory growth, per kept message.
    `rates` (comma-separated deliveries/s) replaces both fan-out sweeps' own; `repeat`
    runs each fan-out rate and publish-rate measure that many times, off and on in turn.
    """
    embedded_rates = [float(r) for r in (rates or EMBEDDED_HISTORY_RATES).split(",")]
    redis_rates = [float(r) for r in (rates or REDIS_HISTORY_RATES).split(",")]
    rows: list[dict[str, Any]] = []
    # 1a, 1b and the embedded storm: one server each with history off and on
    ports = {"off": [free_port()], "on": [free_port()]}
    servers = {kept: start_fastfan(ports[kept][0], (HISTORY_ON if kept == "on" else [])
                                   + NO_HEARTBEAT) for kept in ports}
    try:
        pids = {kept: [server.pid] for kept, server in servers.items()}
        rows += _fanout_side_by_side("embedded, one worker", ports, pids, embedded_rates,
                                     duration, repeat)
        rows += _acked_rates("embedded", ports, pids, duration, repeat)
        rows += _storms("embedded", ports, pids, connections, processes)
    finally:
        for server in servers.values():
            stop(server)
    with tempfile.TemporaryDirectory() as workdir:
        redis_port = free_port()
        redis_server = _start_redis(redis_port, workdir)
        url = f"redis://127.0.0.1:{redis_port}/0"
        ports = {"off": [free_port(), free_port()], "on": [free_port(), free_port()]}
        nodes = {kept: [start_fastfan(port, ["--redis", url, *NO_HEARTBEAT,
                                             *(HISTORY_ON if kept == "on" else [])], pin=False)
                        for port in ports[kept]] for kept in ports}
        try:
            for port in (p for pair in ports.values() for p in pair):
                _wait_ready(port)
            pids = {kept: [n.pid for n in nodes[kept]] + [redis_server.pid] for kept in nodes}
            rows += _fanout_side_by_side("two nodes through Redis", ports, pids, redis_rates,
                                         duration, repeat)
            rows += _acked_rates("redis", ports, pids, duration, repeat)
            rows += _storms("redis", ports, {kept: [nodes[kept][0].pid, redis_server.pid]
                                             for kept in nodes}, connections, processes)
        finally:
            for server in (n for pair in nodes.values() for n in pair):
                stop(server)
        try:
            rows += _memory(redis_port)
        finally:
            redis_server.terminate()
            redis_server.wait(10)
    return rows
