"""Multi-host for real: two fastfan nodes and Redis (two shards) each in its own network
namespace, joined by veth pairs on a bridge; one node partitioned from Redis (routes to
it made unreachable both ways) and healed. A delay on every link with `tc netem` when the
kernel has it. Runs only where namespaces can be made (root, iproute2)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from wire import RawClient

SUBNET = "10.213.77"
DELAY = "5ms"  # per link, each way, with netem


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


def why_not() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"ffprobe{os.getpid()}"
    made = run("ip", "netns", "add", probe)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    run("ip", "netns", "del", probe)
    return None


pytestmark = pytest.mark.skipif(why_not() is not None, reason=str(why_not()))


class Hosts:
    """Namespaces `redis`, `a`, `b` on a bridge: SUBNET.1, .2, .3."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"ffbr{tag}"
        self.namespaces = {name: f"ff{tag}{name}" for name in ("redis", "a", "b")}
        self.address = {"redis": f"{SUBNET}.1", "a": f"{SUBNET}.2", "b": f"{SUBNET}.3"}
        self.delayed = False
        self._do("ip", "link", "add", self.bridge, "type", "bridge")
        self._do("ip", "addr", "add", f"{SUBNET}.254/24", "dev", self.bridge)
        self._do("ip", "link", "set", self.bridge, "up")
        for index, (name, namespace) in enumerate(self.namespaces.items()):
            outside, inside = f"ffv{tag}{index}", f"ffe{tag}{index}"
            self._do("ip", "netns", "add", namespace)
            self._do("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            self._do("ip", "link", "set", inside, "netns", namespace)
            self._do("ip", "link", "set", outside, "master", self.bridge, "up")
            self._do("ip", "-n", namespace, "addr", "add", f"{self.address[name]}/24", "dev",
                     inside)
            self._do("ip", "-n", namespace, "link", "set", inside, "up")
            self._do("ip", "-n", namespace, "link", "set", "lo", "up")
            self.delayed = run("tc", "-n", namespace, "qdisc", "add", "dev", inside, "root",
                               "netem", "delay", DELAY).returncode == 0

    def _do(self, *command: str) -> None:
        done = run(*command)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")

    def inside(self, name: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespaces[name])

    def partition(self, name: str, heal: bool = False) -> None:
        """No route between `name` and the Redis host, either way (or back)."""
        verb = "del" if heal else "add"
        for here, there in ((name, "redis"), ("redis", name)):
            self._do("ip", "-n", self.namespaces[here], "route", verb, "unreachable",
                     f"{self.address[there]}/32")

    def remove(self) -> None:
        for namespace in self.namespaces.values():
            run("ip", "netns", "del", namespace)  # takes its veth pair with it
        run("ip", "link", "del", self.bridge)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Hosts, str]]:
    made = Hosts()
    redis = []
    try:
        for port in (6379, 6380):
            redis.append(subprocess.Popen(
                [*made.inside("redis"), "redis-server", "--port", str(port), "--bind",
                 made.address["redis"], "--protected-mode", "no", "--save", "",
                 "--appendonly", "no", "--logfile", str(tmp_path / f"redis-{port}.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        url = ",".join(f"redis://{made.address['redis']}:{port}/0" for port in (6379, 6380))
        yield made, url
    finally:
        for process in redis:
            process.kill()
            process.wait()
        made.remove()


def publish(client: RawClient, channel: str, data: Any, request_id: Any) -> dict[str, Any]:
    client.publish(channel, data, id=request_id)
    return dict(client.recv_json())


def after_refused(client: RawClient) -> tuple[str, str]:
    """The next message's channel and data, past those a's publishes sent before the 503
    (TCP hands them to Redis once the partition heals: a 503 says the message may still be
    delivered, docs/protocol.md)."""
    while (message := client.recv_json())["data"] in ("cut", "still cut"):
        pass
    return message["channel"], message["data"]


def test_a_node_partitioned_from_redis_refuses_the_other_goes_on_then_it_resubscribes(
        start_server: Any, hosts: tuple[Hosts, str]) -> None:
    net, url = hosts
    a, b = (start_server("--redis", url, host=net.address[name], wrapper=net.inside(name))
            for name in ("a", "b"))
    for node in (a, b):
        node.wait_ready(timeout=15)
    on_a, on_b = a.connect().subscribe("x", "y"), b.connect().subscribe("x", "y")
    from_a, from_b = a.connect(timeout=10), b.connect()
    assert publish(from_a, "x", "first", 1)["type"] == "published"
    for client in (on_a, on_b):
        assert client.recv_json()["data"] == "first"

    net.partition("a")
    # a's publishes wait for Redis at most the pipeline timeout, then 503, and keep
    # failing while it cannot reach Redis
    refused = wait_for(lambda: (r := publish(from_a, "y", "cut", 2))["type"] == "error"
                       and r, timeout=15)
    assert refused["code"] == 503
    assert a.get("/ready")[0] == 503
    assert publish(from_a, "x", "still cut", 3)["code"] == 503
    assert b.get("/ready")[0] == 200
    # both shards' subscribing connections are dropped (their PINGs go unanswered)
    wait_for(lambda: all(f"shard {n}" in a.get("/ready")[2].decode() for n in (0, 1)),
             timeout=15)
    for channel in ("x", "y"):
        assert publish(from_b, channel, "b goes on", 4)["type"] == "published"
        assert on_b.recv_json()["data"] == "b goes on"

    net.partition("a", heal=True)
    a.wait_ready(timeout=15)
    for channel in ("x", "y"):  # a subscribed again: b's publishes reach it
        assert publish(from_b, channel, "healed", 5)["type"] == "published"
        for client in (on_a, on_b):
            assert after_refused(client) == (channel, "healed")
    assert publish(from_a, "x", "a again", 6)["type"] == "published"
    for client in (on_a, on_b):
        assert after_refused(client) == ("x", "a again")
    print("netem delay on every link:", DELAY if net.delayed else "not in this kernel")
