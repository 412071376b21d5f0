"""History and recovery (--history-size 100) against none, side by side in one run.

    ./dev bench --scenarios history --duration 3 --connections 10000 --processes 5
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import re
import subprocess
import tempfile
import time
from typing import Any

from lib import (
    HEADER,
    Subscribers,
    cpu_seconds,
    format_row,
    free_port,
    rss_bytes,
    run_loadgen,
    start_fastfan,
)

from .common import NO_HEARTBEAT, raw_client, start_redis, stop, text_frame, wait_ready

HISTORY_KEPT = 100  # --history-size of the runs with history on
HISTORY_ON = ["--history-size", str(HISTORY_KEPT)]
EMBEDDED_HISTORY_RATES = "100000,500000,1000000"
REDIS_HISTORY_RATES = "50000,200000,500000"
PUBLISHED = b'"type":"published"'


def _publish_acked(port: int, channels: list[str], *, duration: float = 0, count: int = 0,
                   in_flight: int = 64) -> tuple[int, float]:
    """Publishes with an `id`, round-robin over `channels`, `in_flight` ahead of their
    `published` replies, for `duration` s or `count` publishes; 100-byte data. How many
    were acknowledged, in how many seconds."""
    client = raw_client(port)
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
                    text_frame(b'{"type":"publish","channel":"%s","id":%d,"data":{"seq":%d,'
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
    client = raw_client(port)
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
    subscribe = text_frame(json.dumps(ask).encode())
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
    client = raw_client(port)
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
        wait_ready(port)
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
        redis_server = start_redis(redis_port, workdir)
        url = f"redis://127.0.0.1:{redis_port}/0"
        ports = {"off": [free_port(), free_port()], "on": [free_port(), free_port()]}
        nodes = {kept: [start_fastfan(port, ["--redis", url, *NO_HEARTBEAT,
                                             *(HISTORY_ON if kept == "on" else [])], pin=False)
                        for port in ports[kept]] for kept in ports}
        try:
            for port in (p for pair in ports.values() for p in pair):
                wait_ready(port)
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
