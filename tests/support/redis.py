"""A real redis-server, and a real six-node Redis Cluster (three masters, three replicas)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from support.waiting import wait_for
from support.wire import free_port, port_slice, resp

NODE_TIMEOUT_MS = 1000  # a dead master's replica takes over within a few seconds


class RedisServer:
    """A real redis-server on `port` (a free one by default); `kill()` and `start()` again
    on the same port."""

    def __init__(self, log_path: Path, port: int | None = None, *options: str) -> None:
        self.port = free_port() if port is None else port
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_path
        self.options = options  # more redis-server options, e.g. --cluster-enabled yes
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--logfile", str(self.log_path),
             "--enable-debug-command", "local",  # DEBUG SLEEP plays a slow Redis
             *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, timeout=10)

    def ping(self, timeout: float = 1.0) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(resp("PING"))
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str | bytes) -> bytes:
        """One command in RESP; the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(resp(*args))
            return sock.recv(65536)

    def subscribers(self, channel: str) -> int:
        """How many connections Redis has subscribed to a fastfan channel (default prefix)."""
        reply = self.command("PUBSUB", "NUMSUB", f"fastfan:{channel}")
        return int(reply.rsplit(b":", 1)[1].strip())

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def query(node: RedisServer, *args: str) -> Any:
    """A command's parsed reply (redis-py)."""
    with redis.Redis(port=node.port, socket_timeout=5) as client:
        return client.execute_command(*args)


_CLUSTER_PORTS = port_slice(12000, 22700)
_next_cluster_port = _CLUSTER_PORTS.start + os.getpid() % len(_CLUSTER_PORTS)


def cluster_ports(count: int) -> list[int]:
    """`count` ports free with their cluster bus port (+10000), both below the kernel's
    ephemeral range (32768 on), from this test process's own slice (as free_port)."""
    global _next_cluster_port
    found: list[int] = []
    for _ in range(len(_CLUSTER_PORTS)):
        if len(found) == count:
            break
        port = _next_cluster_port
        _next_cluster_port = port + 1 if port + 1 < _CLUSTER_PORTS.stop else _CLUSTER_PORTS.start
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        found.append(port)
    return found


class Cluster:
    """Six redis-servers in cluster mode, made into one cluster by `redis-cli --cluster`;
    `url` names two of them, as fastfan's --redis takes it."""

    def __init__(self, directory: Path, ports: list[int] | None = None) -> None:
        self.nodes: list[RedisServer] = []
        for port in ports or cluster_ports(6):
            home = directory / f"node-{port}"
            home.mkdir()
            self.nodes.append(RedisServer(
                home / "redis.log", port, "--cluster-enabled", "yes", "--dir", str(home),
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # a replica takes over however long ago it last heard from its master
                "--cluster-replica-validity-factor", "0"))
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{node.port}" for node in self.nodes),
                        "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        wait_for(self.settled, timeout=20)
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def reset(self) -> None:
        """As good as new for the next test: a killed node started again (it rejoins, as a
        replica of the one that took over), the cluster settled, every master flushed."""
        for node in self.nodes:
            if node.process is None:
                node.start()
        wait_for(self.settled, timeout=30)
        for port in self.masters_seen_by(self.nodes[0]).values():
            query(next(node for node in self.nodes if node.port == port), "FLUSHALL")

    def settled(self) -> bool:
        """Every live node sees the whole cluster ok, and agrees on the masters."""
        live = [node for node in self.nodes if node.process is not None]
        if not all(b"cluster_state:ok" in query(node, "CLUSTER", "INFO") for node in live):
            return False
        views = {tuple(sorted(self.masters_seen_by(node).items())) for node in live}
        return len(views) == 1

    def masters_seen_by(self, node: RedisServer) -> dict[str, int]:
        """node id -> port of each master that serves slots, as `node` sees it."""
        masters = {}
        for line in query(node, "CLUSTER", "NODES").decode().splitlines():
            fields = line.split()
            if len(fields) > 8 and "master" in fields[2] and "fail" not in fields[2]:
                masters[fields[0]] = int(re.split("[:@]", fields[1])[1])
        return masters

    def owner(self, channel: str) -> RedisServer:
        """The live master that serves `channel`'s slot."""
        slot = key_slot(f"fastfan:{channel}".encode())
        for node in self.nodes:
            if node.process is not None and self._serves(node, slot):
                return node
        raise AssertionError(f"no live master serves slot {slot}")

    @staticmethod
    def _serves(node: RedisServer, slot: int) -> bool:
        for line in query(node, "CLUSTER", "NODES").decode().splitlines():
            fields = line.split()
            if "myself" in fields[2] and "master" in fields[2]:
                for span in fields[8:]:
                    low, _, high = span.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return True
        return False

    @staticmethod
    def replicated(master: RedisServer) -> bool:
        """Every replica of `master` has acknowledged all it was sent."""
        _, offset, replicas = query(master, "ROLE")
        return bool(replicas) and all(int(replica[2]) >= offset for replica in replicas)

    def subscribers(self, channel: str) -> int:
        return int(query(self.owner(channel), "PUBSUB", "SHARDNUMSUB", f"fastfan:{channel}")[1])

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()
