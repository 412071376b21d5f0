"""What presence and join/leave cost the server when a client abuses them (issue #25,
findings 7, 8, 9 and 19): worker CPU, memory, and bytes out per byte in.

Run from the root of the tree to measure, with its own venv:

    .venv/bin/python benchmarks/security_presence.py toggle --bus "one worker" [--paced]
    .venv/bin/python benchmarks/security_presence.py repeat --bus redis
    .venv/bin/python benchmarks/security_presence.py presence --bus "two workers" --askers 50
    .venv/bin/python benchmarks/security_presence.py cut

(From another tree, e.g. the previous build: `cd /work/baseline && .venv/bin/python
/path/to/this/file ...`.)

Each prints one JSON line. It starts real servers with the tests' fixtures (tests/).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path.cwd() / "tests"))
from conftest import RedisServer, Server, children, process_holding, token
from wire import RawClient, frame

INFO = "x" * 1000
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def rchar(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("rchar")


def redis_cpu(redis: RedisServer | None) -> float:
    if redis is None:
        return 0.0
    info = redis.command("INFO", "cpu").decode()
    return sum(float(line.split(":")[1]) for line in info.splitlines()
               if line.startswith(("used_cpu_sys:", "used_cpu_user:")))


class Drain(threading.Thread):
    """Reads a socket until it closes or stays quiet: how many bytes, and whether it closed."""

    def __init__(self, client: RawClient, keep: bool = False) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.kept = bytearray(client.buffer) if keep else None  # what it read, if asked
        self.bytes = len(client.buffer)
        self.closed = False
        self.last = time.monotonic()
        client.sock.settimeout(0.2)
        self.start()

    def run(self) -> None:
        while True:
            try:
                chunk = self.client.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                self.closed = True
                return
            if not chunk:
                self.closed = True
                return
            self.bytes += len(chunk)
            self.last = time.monotonic()
            if self.kept is not None:
                self.kept += chunk

    def quiet_for(self, seconds: float) -> bool:
        return self.closed or time.monotonic() - self.last >= seconds


def wait_quiet(drains: list[Drain], seconds: float = 1.0, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not all(d.quiet_for(seconds) for d in drains):
        time.sleep(0.1)


@contextmanager
def server_on(bus: str, workdir: Path, *args: str) -> Iterator[tuple[Server, RedisServer | None]]:
    redis = RedisServer(workdir / "redis.log") if bus == "redis" else None
    try:
        if redis is not None:
            server = Server(workdir / "server.log", "--redis", redis.url, *args)
        else:
            server = Server(workdir / "server.log",
                            *(("--workers", "2") if bus == "two workers" else ()), *args)
        server.wait_ready()
        try:
            yield server, redis
        finally:
            server.stop()
    finally:
        if redis is not None:
            redis.kill()


def connect(server: Server, user: str, **claims: Any) -> RawClient:
    client = RawClient(server.host, server.port, f"/?token={token(user, **claims)}",
                       timeout=30)
    client.recv_json()
    return client


def toggle(bus: str, toggles: int, watchers: int, paced: bool) -> dict[str, Any]:
    """Finding 7: a client allowed to publish nothing toggles its subscription to a channel
    that `watchers` clients watch with joinLeave; its token carries a 1 KiB info."""
    with tempfile.TemporaryDirectory() as workdir, server_on(bus, Path(workdir)) as (server,
                                                                                     redis):
        watching = []
        for _ in range(watchers):
            watcher = connect(server, "watcher")
            watcher.send_json({"type": "subscribe", "channel": "room", "joinLeave": True})
            watching.append(watcher)
        time.sleep(1)
        drains = [Drain(w) for w in watching]
        wait_quiet(drains)
        received_before = sum(d.bytes for d in drains)
        toggler = connect(server, "toggler", info=INFO, publish=[])
        pids = children(server.process.pid)
        cpu, rcpu = cpu_seconds(pids), redis_cpu(redis)
        requests = (frame(1, b'{"type":"subscribe","channel":"room"}'),
                    frame(1, b'{"type":"unsubscribe","channel":"room"}'))
        pair = b"".join(requests)
        sent = replied = 0
        started = time.monotonic()
        if paced:  # each request on its own, once the one before is answered
            for _ in range(toggles):
                for request in requests:
                    toggler.sock.sendall(request)
                    sent += len(request)
                    replied += toggler.recv_whole_frame().size
            own = Drain(toggler)
            own.bytes += replied
        else:
            own = Drain(toggler)
            for _ in range(toggles // 500):
                toggler.sock.sendall(pair * 500)
                sent += 500 * len(pair)
        wait_quiet([*drains, own])
        elapsed = time.monotonic() - started - 1.0
        out = sum(d.bytes for d in drains) - received_before + own.bytes
        return {"finding": 7, "bus": bus, "toggles": toggles, "watchers": watchers,
                "paced": paced, "bytes_in": sent, "bytes_out": out,
                "out_per_in": round(out / sent, 1),
                "watchers_closed": sum(d.closed for d in drains),
                "worker_cpu_s": round(cpu_seconds(pids) - cpu, 2),
                "redis_cpu_s": round(redis_cpu(redis) - rcpu, 2),
                "seconds": round(elapsed, 2)}


def repeat(bus: str, repeats: int) -> dict[str, Any]:
    """Finding 8: while the bus cannot confirm (Redis killed; another worker stopped), one
    connection repeats a subscribe with a 64 KB id."""
    with tempfile.TemporaryDirectory() as workdir, server_on(bus, Path(workdir)) as (server,
                                                                                     redis):
        client = connect(server, "repeater")
        workers = children(server.process.pid)
        pid = process_holding(client.sock.getsockname()[1], workers) or workers[0]
        stopped = [p for p in workers if p != pid]
        if redis is not None:
            redis.kill()
        else:
            os.kill(stopped[0], signal.SIGSTOP)
        try:
            drain = Drain(client)
            rss, cpu = status_kib(pid, "VmRSS"), cpu_seconds([pid])
            request = frame(1, json.dumps({"type": "subscribe", "channel": "room",
                                           "id": "i" * 65_000}).encode())
            sent = 0
            for _ in range(repeats // 10):
                client.sock.sendall(request * 10)
                sent += 10 * len(request)
            wait_quiet([drain], 2.0)
            row = {"finding": 8, "bus": bus, "repeats": repeats, "bytes_in": sent,
                   "bytes_out": drain.bytes, "client_closed": drain.closed,
                   "worker_rss_grown_mib": round((status_kib(pid, "VmRSS") - rss) / 1024, 1),
                   "worker_cpu_s": round(cpu_seconds([pid]) - cpu, 2)}
        finally:
            if redis is None:
                os.kill(stopped[0], signal.SIGCONT)
        return row


def members_of_room(server: Any, members: int) -> list[Any]:
    """`members` connections subscribed to "room", each with a 1 KiB info."""
    room = []
    for n in range(members):
        member = connect(server, f"member{n}", info=INFO)
        member.send_json({"type": "subscribe", "channel": "room"})
        room.append(member)
    for member in room:
        member.recv_json()
    return room


def presence(bus: str, members: int, asked: int, kind: str, askers: int) -> dict[str, Any]:
    """Finding 9: `asked` presence (or presence_stats) requests, in bursts from `askers`
    connections, on a channel of `members` members with a 1 KiB info each."""
    with tempfile.TemporaryDirectory() as workdir, server_on(bus, Path(workdir)) as (server,
                                                                                     redis):
        _room = members_of_room(server, members)  # open while measured
        time.sleep(1)
        asking = [connect(server, "asker") for _ in range(askers)]
        pids = children(server.process.pid)
        cpu, rcpu = cpu_seconds(pids), redis_cpu(redis)
        drains = [Drain(asker, keep=True) for asker in asking]
        request = frame(1, json.dumps({"type": kind, "channel": "room"}).encode())
        share = asked // askers
        started = time.monotonic()
        for sent in range(0, share, 100):
            for asker in asking:
                asker.sock.sendall(request * min(100, share - sent))
        deadline = started + 120
        while (sum((d.kept or b"").count(b'{"type":') for d in drains) < asked
               and time.monotonic() < deadline):
            time.sleep(0.01)  # every request answered (a reply or an error)
        answered = time.monotonic() - started
        return {"finding": 9, "bus": bus, "members": members, "asked": asked, "kind": kind,
                "askers": askers, "bytes_in": asked * len(request),
                "bytes_out": sum(d.bytes for d in drains),
                "refused": sum((d.kept or b"").count(b'"code":429') for d in drains),
                "worker_cpu_s": round(cpu_seconds(pids) - cpu, 2),
                "redis_cpu_s": round(redis_cpu(redis) - rcpu, 2),
                "seconds": round(answered, 2)}


def cut(members: int) -> dict[str, Any]:
    """Finding 19: with two workers, what the asking worker reads for one `presence` of a
    channel whose `members` have a 1 KiB info each (--presence-limit 100)."""
    with tempfile.TemporaryDirectory() as workdir, server_on(
            "two workers", Path(workdir), "--presence-limit", "100") as (server, _):
        _room = members_of_room(server, members)  # open while measured
        asker = connect(server, "asker")
        pid = process_holding(asker.sock.getsockname()[1], children(server.process.pid))
        assert pid is not None
        read = rchar(pid)
        asker.send_json({"type": "presence", "channel": "room"})
        reply = asker.recv_json()
        return {"finding": 19, "members": members, "count": reply["data"]["count"],
                "listed": len(reply["data"]["clients"]),
                "asking_worker_read_bytes": rchar(pid) - read}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["toggle", "repeat", "presence", "cut"])
    parser.add_argument("--bus", default="one worker",
                        choices=["one worker", "two workers", "redis"])
    parser.add_argument("--paced", action="store_true",
                        help="toggle: send each request once the one before is answered")
    parser.add_argument("--kind", default="presence_stats", choices=["presence",
                                                                     "presence_stats"])
    parser.add_argument("--askers", type=int, default=1,
                        help="presence: connections the requests are shared among")
    options = parser.parse_args()
    socket.setdefaulttimeout(30)
    if options.scenario == "toggle":
        row = toggle(options.bus, 10_000, 20, options.paced)
    elif options.scenario == "repeat":
        row = repeat("redis" if options.bus == "one worker" else options.bus, 4000)
    elif options.scenario == "presence":
        row = presence(options.bus, 2000, 2000, options.kind, options.askers)
    else:
        row = cut(2000)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
