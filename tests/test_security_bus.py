"""The embedded bus is the server's own: other users cannot reach it, and a worker that
misbehaves on it is dropped without hurting the one it talks to (issue #20)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from support.processes import children, peak_rss_kib
from support.server import Server
from support.waiting import wait_for
from support.wire import RawClient
from support.workers import place

PUBLISH, HELLO = 2, 1
# A record as workers frame them: length of what follows, kind, channel length, channel.
FORGED = struct.pack("!IBB", 2 + 6 + 2, PUBLISH, 6) + b"secret" + b"{}"

# Runs as another user: connect to each address, inject a message, say what happened.
OUTSIDER = textwrap.dedent("""
    import json, socket, sys
    results = {}
    for address in json.loads(sys.argv[1]):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2)
        try:
            sock.connect(address.replace("@", "\\0", 1) if address.startswith("@") else address)
            sock.sendall(bytes.fromhex(sys.argv[2]))
            results[address] = "connected"
        except OSError as exc:
            results[address] = type(exc).__name__
        sock.close()
    print(json.dumps(results))
""")

# Forks, in the process that becomes the master, a child that waits for attack.py: a
# process as close to the workers as one can be (same uid, a child of the master).
SITECUSTOMIZE = textwrap.dedent("""
    import ctypes, os, runpy, signal, time
    here = os.path.dirname(os.path.abspath(__file__))
    if os.fork() == 0:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        open(os.path.join(here, "insider.pid"), "w").write(str(os.getpid()))
        for _ in range(1200):
            if os.path.exists(os.path.join(here, "go")):
                runpy.run_path(os.path.join(here, "attack.py"))
                break
            time.sleep(0.05)
        os._exit(0)
""")

# Run by that child: a header claiming 0xFFFFFFF0 bytes, followed by 64 MiB; then records
# that break the framing. Says how much the worker took before it hung up on each.
INSIDER = textwrap.dedent("""
    import json, os, socket, struct
    here = os.path.dirname(os.path.abspath(__file__))
    target = open(os.path.join(here, "target")).read()
    attacks = {
        "huge": struct.pack("!IBB", 0xFFFFFFF0, 2, 0),
        "bad slot": struct.pack("!IBB", 3, 1, 1) + b"7",
        "unknown kind": struct.pack("!IBB", 3, 99, 1) + b"0",
        "channel not ascii": struct.pack("!IBB", 3, 1, 1) + b"\\xff",
    }
    results = {}
    for name, header in attacks.items():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(target)
        sent, chunk = 0, b"x" * (1 << 20)
        try:
            sock.sendall(header)
            while sent < 64 << 20:
                sent += sock.send(chunk)
            closed = sock.recv(1) == b""  # the data was taken: did it hang up at all?
        except TimeoutError:
            closed = False
        except OSError:
            closed = True
        results[name] = {"sent": sent, "closed": closed}
        sock.close()
    open(os.path.join(here, "result.json"), "w").write(json.dumps(results))
""")


def unix_addresses_of(pids: list[int]) -> dict[str, int]:
    """Bound Unix socket addresses ("@..." for abstract ones) held by `pids`, by holder."""
    inodes = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
            except FileNotFoundError:
                continue  # closed since the listing
            if link.startswith("socket:["):
                inodes[link[8:-1]] = pid
    found = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes:
            found[fields[7]] = inodes[fields[6]]
    return found


def subscribers_on_each_worker(server: Server, channel: str,
                               workers: list[int]) -> dict[int, RawClient]:
    """One subscriber of `channel` held by each worker; keyed by worker pid."""
    return {pid: client for pid, (client,) in
            place(server, channels=(channel,), workers=workers).items()}


def crosses_workers(server: Server, workers: list[int], channel: str) -> None:
    """A publish from each worker's client reaches the other worker's subscriber."""
    placed = subscribers_on_each_worker(server, channel, workers)
    for publisher_pid, publisher in placed.items():
        publisher.send_json({"type": "publish", "channel": channel, "data": publisher_pid})
        for client in placed.values():
            message = client.recv_json()
            assert (message["type"], message["data"]) == ("message", publisher_pid), message


@pytest.mark.slow
def test_another_user_cannot_reach_the_bus(start_server: Any) -> None:
    server = start_server("--workers", "2")
    workers = children(server.process.pid)
    placed = subscribers_on_each_worker(server, "secret", workers)
    bound = unix_addresses_of(workers)
    assert len(bound) >= 2, bound  # each worker's bus listener, whatever its name
    addresses = sorted({*bound, *(f"@fastfan-{server.process.pid}-{slot}" for slot in (0, 1))})
    result = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         sys.executable, "-I", "-S", "-c", OUTSIDER, json.dumps(addresses),
         (FORGED + struct.pack("!IBB", 3, HELLO, 1) + b"0").hex()],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout)
    assert "connected" not in outcomes.values(), outcomes
    assert all(outcomes[a] == "PermissionError" for a in bound if not a.startswith("@")), outcomes
    # Nothing forged arrived: the first message either subscriber sees is a real one.
    publisher = next(iter(placed.values()))
    publisher.send_json({"type": "publish", "channel": "secret", "data": "real"})
    for client in placed.values():
        assert client.recv_json()["data"] == "real"


@pytest.mark.slow
def test_our_user_outside_the_server_is_refused_before_a_byte_is_read(
        start_server: Any) -> None:
    server = start_server("--workers", "2")
    workers = children(server.process.pid)
    placed = subscribers_on_each_worker(server, "secret", workers)
    paths = [a for a in unix_addresses_of(workers) if a.startswith("/")]
    assert len(paths) == 2, paths
    for path in paths:
        assert (os.stat(os.path.dirname(path)).st_mode & 0o777) == 0o700
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path)  # root may enter the directory; the worker still says no
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(struct.pack("!IBB", 3, HELLO, 1) + b"0" + FORGED)
                assert sock.recv(1) == b""
    assert server.log().count("bus: refused a connection") == 2
    publisher = next(iter(placed.values()))
    publisher.send_json({"type": "publish", "channel": "secret", "data": "real"})
    for client in placed.values():
        assert client.recv_json()["data"] == "real"


@pytest.mark.slow
def test_a_worker_that_breaks_the_framing_is_dropped_and_costs_nothing(
        start_server: Any, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (site / "attack.py").write_text(INSIDER)
    server = start_server("--workers", "2", env={
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))})
    insider = int(wait_for(lambda: (site / "insider.pid").exists()
                           and (site / "insider.pid").read_text()))
    workers = [pid for pid in children(server.process.pid) if pid != insider]
    assert len(workers) == 2
    crosses_workers(server, workers, "before")
    bound = unix_addresses_of(workers)
    victim = workers[0]
    (target,) = [address for address, pid in bound.items() if pid == victim]
    (site / "target").write_text(target.replace("@", "\0", 1) if target[0] == "@" else target)
    before = peak_rss_kib(victim)  # the peak: a buffer freed when the attacker left counts
    (site / "go").touch()
    results = json.loads(wait_for(lambda: (site / "result.json").exists()
                                  and (site / "result.json").read_text(), timeout=60))
    grown = peak_rss_kib(victim) - before
    for name, outcome in results.items():
        assert outcome["closed"], (name, outcome)
        assert outcome["sent"] < 8 << 20, (name, outcome)  # the kernel's buffers, no more
    assert grown < 16 << 10, f"the victim grew by {grown} KiB"
    assert [p for p in children(server.process.pid) if p != insider] == sorted(workers)
    crosses_workers(server, workers, "after")
    log = server.log()
    assert "Traceback" not in log
    dropped = [line for line in log.splitlines() if "bus: dropped the connection" in line]
    assert len(dropped) == 4, dropped
    assert "0xfffffff0" in dropped[0].lower() or str(0xFFFFFFF0) in dropped[0], dropped
