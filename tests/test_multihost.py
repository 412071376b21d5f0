"""Multi-host for real: two fastfan nodes and Redis (two shards) each in its own network
namespace, joined by veth pairs on a bridge; one node partitioned from Redis (routes to
it made unreachable both ways) and healed; and the two nodes publishing to each other
while every namespace drops a share of the TCP packets it sends on its link, at random
(an nftables rule with `numgen random` and a counter: no sch_netem needed), skipped where
`nft` or the kernel's nftables is missing. A delay on every link with `tc netem` when the
kernel has it. Runs only where namespaces can be made (root, iproute2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.waiting import wait_for
from support.wire import RawClient

SUBNET = "10.213.77"
DELAY = "5ms"  # per link, each way, with netem
LOSS = 5  # percent of the TCP packets each namespace sends on its link, dropped by nftables
LOSS_TABLE = "fastfan_loss"
ROUNDS, BURST = 20, 20  # publishes from each node under loss: ROUNDS bursts of BURST


def run(*command: str) -> subprocess.CompletedProcess[str]:
    """The command's outcome; a command not installed fails as a shell's would (127)."""
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        return subprocess.CompletedProcess(command, 127, "", str(error))


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


pytestmark = [pytest.mark.slow,  # network namespaces and lossy links
              pytest.mark.skipif(why_not() is not None, reason=str(why_not()))]


class Hosts:
    """Namespaces `redis`, `a`, `b` on a bridge: SUBNET.1, .2, .3."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"ffbr{tag}"
        self.namespaces = {name: f"ff{tag}{name}" for name in ("redis", "a", "b")}
        self.address = {"redis": f"{SUBNET}.1", "a": f"{SUBNET}.2", "b": f"{SUBNET}.3"}
        self.delayed = False
        self.links: dict[str, str] = {}  # each namespace's end of its veth pair
        self.outside: list[str] = []  # and the bridge's
        try:
            self._make(tag)
        except BaseException:
            self.remove()
            raise

    def _make(self, tag: str) -> None:
        self._do("ip", "link", "add", self.bridge, "type", "bridge")
        self._do("ip", "addr", "add", f"{SUBNET}.254/24", "dev", self.bridge)
        self._do("ip", "link", "set", self.bridge, "up")
        for index, (name, namespace) in enumerate(self.namespaces.items()):
            outside, inside = f"ffv{tag}{index}", f"ffe{tag}{index}"
            self.links[name] = inside
            self._do("ip", "netns", "add", namespace)
            self._do("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            self.outside.append(outside)
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

    def lose(self, percent: int) -> str | None:
        """Each namespace drops `percent`% of the TCP packets it sends on its link, at random,
        counted (so every packet between two namespaces may be lost once); why it cannot,
        or None."""
        if shutil.which("nft") is None:
            return "no packet loss: needs nftables' `nft` (Debian package nftables)"
        for name in self.namespaces:
            made = run(*self.inside(name), "nft", (
                f"table inet {LOSS_TABLE} {{ chain output {{ type filter hook output priority 0;"
                f' oifname "{self.links[name]}" meta l4proto tcp'
                f" numgen random mod 100 < {percent} counter drop; }}; }}"))
            if made.returncode != 0:
                return f"no packet loss: cannot make an nftables table: {made.stderr.strip()}"
        return None

    def dropped(self) -> int:
        """TCP packets the `lose` rules dropped, in all the namespaces together (their
        counters)."""
        total = 0
        for name in self.namespaces:
            listing = run(*self.inside(name), "nft", "-j", "list", "table", "inet", LOSS_TABLE)
            for item in json.loads(listing.stdout)["nftables"]:
                for expression in item.get("rule", {}).get("expr", []):
                    total += expression.get("counter", {}).get("packets", 0)
        return total

    def retransmitted(self) -> int:
        """TCP segments retransmitted so far, in all the namespaces together."""
        total = 0
        for name in self.namespaces:
            snmp = run(*self.inside(name), "cat", "/proc/net/snmp").stdout
            names, values = (line.split() for line in snmp.splitlines()
                             if line.startswith("Tcp:"))
            total += int(values[names.index("RetransSegs")])
        return total

    def remove(self) -> None:
        # Each veth pair by name: a namespace deleted lives on (its veth with it) while its
        # closed TCP connections still retransmit, and the next test of this process would
        # find the names taken.
        for outside in self.outside:
            run("ip", "link", "del", outside)  # both ends
        for namespace in self.namespaces.values():
            run("ip", "netns", "del", namespace)
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


@pytest.fixture
def nodes(start_server: Any, hosts: tuple[Hosts, str]) -> tuple[Hosts, Any, Any]:
    """Nodes a and b, one worker each, on both Redis shards, ready."""
    net, url = hosts
    a, b = (start_server("--redis", url, host=net.address[name], wrapper=net.inside(name))
            for name in ("a", "b"))
    for node in (a, b):
        node.wait_ready(timeout=15)
    return net, a, b


def delay_applied(net: Hosts) -> str:
    return f"netem delay on every link: {DELAY if net.delayed else 'not in this kernel'}"


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
        nodes: tuple[Hosts, Any, Any]) -> None:
    net, a, b = nodes
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
    print(delay_applied(net))


def test_under_packet_loss_every_acknowledged_publish_arrives_on_both_nodes_once_in_order(
        nodes: tuple[Hosts, Any, Any]) -> None:
    net, a, b = nodes
    listeners = [node.connect(timeout=10).subscribe("x", "y") for node in (a, b)]
    publishers = {"x": a.connect(timeout=10), "y": b.connect(timeout=10)}
    retransmitted_before = net.retransmitted()
    unable = net.lose(LOSS)
    if unable is not None:
        pytest.skip(unable)
    started = time.monotonic()
    # bursts from both nodes at once, each publish answered before the next burst:
    # a lost segment is retransmitted while others are in flight, not one RTO each
    for burst in range(ROUNDS):
        numbers = range(burst * BURST, (burst + 1) * BURST)
        for channel, publisher in publishers.items():
            publisher.send_json_burst([{"type": "publish", "channel": channel, "data": n,
                                        "id": n} for n in numbers])
        for publisher in publishers.values():
            answers = {r["id"]: r["type"] for r in (publisher.recv_json() for _ in numbers)}
            assert answers == dict.fromkeys(numbers, "published")
        assert a.get("/ready")[0] == b.get("/ready")[0] == 200  # Redis still reached
    for listener in listeners:  # both channels, each in its publisher's order, each once
        received = [listener.recv_json() for _ in range(2 * ROUNDS * BURST)]
        for channel in publishers:
            assert ([m["data"] for m in received if m["channel"] == channel]
                    == list(range(ROUNDS * BURST)))
    took = time.monotonic() - started
    dropped, retransmitted = net.dropped(), net.retransmitted() - retransmitted_before
    assert dropped > 0 and retransmitted > 0  # the loss was real, TCP made up for it
    print(f"{delay_applied(net)}; loss {LOSS}% of the TCP packets out of every namespace:"
          f" {dropped} dropped, {retransmitted} segments retransmitted;"
          f" {2 * ROUNDS * BURST} publishes acknowledged and delivered to both nodes in"
          f" {took:.1f} s")
