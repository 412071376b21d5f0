"""History costs what its bounds say and no more, whoever asks (issue #25): positions past a
signed 64-bit integer are refused before any store sees them, a worker keeps at most
--history-max-bytes and one connection a share of it, a read of a channel never published
creates nothing, answers fit the client's buffer and Redis's, and reads never cost a
publisher or a bystander anything.

Each test runs on the buses it concerns: the embedded bus of one worker, of two workers
(the mesh, where a channel's history is kept by its owner worker), and Redis. Figures (the
memory a test grew, the bytes it sent) are printed: `./dev test tests/test_security_history.py
-s` shows them.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support.api import call, start_api
from support.processes import children
from support.redis import RedisServer
from support.server import Server
from support.waiting import wait_for
from support.wire import RSV1, TEXT, RawClient, deflate
from support.workers import one_per_worker

BUSES = ["embedded", "mesh", "redis"]
COMPRESSED = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
BIG = "x" * 60_000  # a message of about 60 KB that permessage-deflate sends in ~100 bytes


class Bus:
    """A bus to run a server on: its options, and its Redis if it has one."""

    def __init__(self, name: str, redis: RedisServer | None) -> None:
        self.name, self.redis = name, redis
        self.options = {"embedded": ["--workers", "1"], "mesh": ["--workers", "2"]}.get(
            name, ["--redis", redis.url if redis else ""])


@pytest.fixture(params=BUSES)
def bus(request: pytest.FixtureRequest) -> Bus:
    redis = request.getfixturevalue("redis_server") if request.param == "redis" else None
    return Bus(request.param, redis)


def start(start_server: Any, bus: Bus, *options: str) -> Server:
    server: Server = start_server("--history-size", "100", *options, *bus.options)
    # Ready on every worker (each answers /ready for itself; 8 asks reach both): with two,
    # once they are connected to each other, as the owner of a channel's history may be
    # the other one.
    wait_for(lambda: all(server.get("/ready")[0] == 200 for _ in range(8)))
    return server


def clients_on_every_worker(server: Server, bus: Bus) -> list[RawClient]:
    return list(one_per_worker(server).values()) if bus.name == "mesh" else [server.connect()]


def rss_kib(server: Server) -> int:
    """The resident memory of every worker of `server`, summed."""
    total = 0
    for worker in children(server.process.pid):
        for line in Path(f"/proc/{worker}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def redis_memory_kib(redis: RedisServer) -> int:
    info = redis.command("INFO", "memory").decode()
    return int(info.split("used_memory:", 1)[1].split()[0]) // 1024


def memory_kib(server: Server, bus: Bus) -> int:
    """Where history is kept: the workers' memory, or Redis's."""
    return redis_memory_kib(bus.redis) if bus.redis is not None else rss_kib(server)


def publish_compressed(client: RawClient, channel: str, data: str, request_id: int) -> int:
    """A publish sent with permessage-deflate; the bytes it took on the wire."""
    payload = deflate(json.dumps({"type": "publish", "channel": channel, "data": data,
                                  "id": request_id}).encode())
    client.send_frame(TEXT, payload, rsv=RSV1)
    return len(payload) + 14


def replies_by_id(client: RawClient, count: int) -> dict[int, dict[str, Any]]:
    """The next `count` replies that carry an `id`, by id (other messages skipped)."""
    replies: dict[int, dict[str, Any]] = {}
    while len(replies) < count:
        reply = client.recv_json()
        if "id" in reply:
            replies[reply["id"]] = reply
    return replies


def fill(server: Server, channel: str, count: int, data: str = BIG) -> None:
    """`count` messages (of about 60 KB by default) kept on `channel`: 15 per connection,
    within what one connection may add to history at once (--publish-rate x 1 KiB, twice)."""
    for first in range(0, count, 15):
        publisher = server.connect(headers=COMPRESSED)
        for n in range(first, min(first + 15, count)):
            publish_compressed(publisher, channel, data, n)
        replies = replies_by_id(publisher, min(15, count - first))
        assert {reply["type"] for reply in replies.values()} == {"published"}, replies
        publisher.close()


# 1 and 17 -----------------------------------------------------------------------------

def test_a_position_past_a_signed_64_bit_integer_is_refused_and_stalls_nothing(
        start_server: Any, bus: Bus) -> None:
    """A `recover.offset` or `since` of 2^63 and more: a 400 on every path (the mesh's read
    failed and left the channel unanswerable on that worker; Redis's script failed and
    logged a warning per request), and the channel's subscribers are answered after it."""
    server, api_port = start_api(start_server, "--history-size", "100", *bus.options)
    if bus.redis is not None:
        wait_for(lambda: server.get("/ready")[0] == 200)
    clients = clients_on_every_worker(server, bus)
    for huge in (2**63, 2**64 + 1, 10**30):
        for client in clients:
            client.send_json({"type": "subscribe", "channel": "stall",
                              "recover": {"offset": huge, "epoch": "e"}})
            error = client.recv_json()
            assert (error["type"], error["code"]) == ("error", 400), error
            client.send_json({"type": "history", "channel": "stall", "since": huge})
            error = client.recv_json()
            assert (error["type"], error["code"]) == ("error", 400), error
        status, answer = call(api_port, "history", {"channel": "stall", "since": huge})
        assert status == 400, answer
    # The channel waits for no read on any worker: its subscribers are answered.
    started = time.monotonic()
    for client in clients:
        client.send_json({"type": "subscribe", "channel": "stall",
                          "recover": {"offset": 0, "epoch": "e"}})
        assert client.recv_json()["type"] == "subscribed"
    print(f"\n[{bus.name}] subscribed after the attack in "
          f"{(time.monotonic() - started) * 1000:.1f} ms")
    log = server.log()
    assert "Traceback" not in log and "history read of" not in log


# 2 ------------------------------------------------------------------------------------

def test_one_connection_cannot_fill_history(start_server: Any, bus: Bus) -> None:
    """The review's attack: once to each of 3,000 channels, a compressed 60 KB message
    (~100 bytes on the wire), within --publish-rate. One connection adds at most
    --publish-rate x 1 KiB a second (1 MiB, in bursts of 2); the rest is refused with 429."""
    server = start(start_server, bus)
    client = server.connect(headers=COMPRESSED)
    before = memory_kib(server, bus)
    started = time.monotonic()
    sent, refused = 0, []
    for first in range(0, 3000, 100):  # in bursts, under --publish-rate (1000/s, 2000 burst)
        for n in range(first, first + 100):
            sent += publish_compressed(client, f"fill.{n}", BIG, n)
        # (each answered by its id, or, past what the connection may inflate, refused
        # before it is read: a 429 without one)
        refused += [reply for reply in (client.recv_json() for _ in range(100))
                    if reply["type"] == "error"]
    elapsed = time.monotonic() - started
    grown = memory_kib(server, bus) - before
    kept_kib = (3000 - len(refused)) * (len(BIG) + 256) / 1024
    print(f"\n[{bus.name}] 3000 publishes in {elapsed:.1f} s, {sent} bytes sent: history grew "
          f"{grown / 1024:.1f} MiB; {3000 - len(refused)} kept, {len(refused)} refused")
    assert {reply["code"] for reply in refused} == {429}
    assert "history quota exceeded" in refused[0]["message"]
    assert kept_kib <= (2 + elapsed) * 1024 * 1.05  # a burst of 2 MiB, then 1 MiB a second
    assert grown < kept_kib + 8 * 1024


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_worker_keeps_at_most_history_max_bytes(start_server: Any, workers: str) -> None:
    """Many connections, each within its share: past --history-max-bytes the publish is
    refused (507, said why), and no channel's history is dropped for it."""
    server = start_server("--history-size", "100", "--history-max-bytes", str(8 << 20),
                          "--workers", workers)
    before = rss_kib(server)
    publishers = [server.connect(headers=COMPRESSED) for _ in range(200)]
    refused = []
    for index, publisher in enumerate(publishers):  # 2 messages each: 128 KiB, its share
        for n in range(2):
            publish_compressed(publisher, f"kept.{index}", BIG, n)
    for publisher in publishers:
        refused += [reply for reply in replies_by_id(publisher, 2).values()
                    if reply["type"] == "error"]
    grown = rss_kib(server) - before
    print(f"\n[{workers} worker(s)] 400 publishes of 60 KB: workers grew "
          f"{grown / 1024:.1f} MiB; {len(refused)} refused")
    assert refused and {reply["code"] for reply in refused} == {507}
    assert "--history-max-bytes" in refused[0]["message"]
    assert grown < int(workers) * 8 * 1024 + 24 * 1024
    reader = server.connect()
    reader.send_json({"type": "history", "channel": "kept.0"})
    assert [m["offset"] for m in reader.recv_json()["data"]["messages"]] == [1, 2]


# 3 ------------------------------------------------------------------------------------

def test_reading_channels_never_published_creates_nothing(start_server: Any, bus: Bus) -> None:
    """20,000 `history` requests on fresh channel names (1,000 connections, 20 each: the
    burst of the per-connection rate; 2,000 with Redis) leave no state behind: no epoch
    hash in Redis, no memory in the workers (measured after a first round of as many, which
    brings whatever buffers any reads need)."""
    server = start(start_server, bus)
    connections = 1000 if bus.redis is None else 100
    clients = [server.connect() for _ in range(connections)]

    def read_fresh_channels(round: int) -> int:
        sent = 0
        for index, client in enumerate(clients):  # 20 reads at a time
            requests = [{"type": "history", "channel": f"fresh.{round}.{index}.{n}", "id": n}
                        for n in range(20)]
            client.send_json_burst(requests)
            sent += sum(len(json.dumps(r)) + 6 for r in requests)
            replies = replies_by_id(client, 20)
            assert {reply["data"]["offset"] for reply in replies.values()} == {0}
        return sent

    read_fresh_channels(0)  # the buffers and caches that any reads bring, once
    keys_before = int(bus.redis.command("DBSIZE")[1:]) if bus.redis is not None else 0
    before = rss_kib(server)
    time.sleep(2.1)  # the connections' read rate refills its burst of 20
    sent = read_fresh_channels(1)
    grown = rss_kib(server) - before
    created = (int(bus.redis.command("DBSIZE")[1:]) - keys_before
               if bus.redis is not None else 0)
    print(f"\n[{bus.name}] {connections * 20} reads, {sent} bytes sent: workers grew "
          f"{grown / 1024:.1f} MiB; Redis keys created: {created}")
    assert created == 0
    assert grown < 8 * 1024  # (the same without the fix: 24-26 MiB)


def test_a_subscriber_from_before_the_first_message_recovers_it(start_server: Any,
                                                                bus: Bus) -> None:
    """A read that created nothing still answers the epoch the first message starts: a
    subscriber from offset 0 recovers every message since; another epoch does not."""
    server = start(start_server, bus)
    early = server.connect()
    early.send_json({"type": "subscribe", "channel": "later"})
    position = early.recv_json()
    assert position["offset"] == 0
    publisher = server.connect()
    for n in range(3):
        publisher.publish("later", n, id=n)
    acknowledged = replies_by_id(publisher, 3)
    assert {reply["epoch"] for reply in acknowledged.values()} == {position["epoch"]}
    back = server.connect()
    back.send_json({"type": "subscribe", "channel": "later",
                    "recover": {"offset": 0, "epoch": position["epoch"]}})
    assert back.recv_json()["recovered"] is True
    assert [back.recv_json()["data"] for _ in range(3)] == [0, 1, 2]
    stranger = server.connect()
    stranger.send_json({"type": "subscribe", "channel": "later",
                        "recover": {"offset": 0, "epoch": "00000000"}})
    assert stranger.recv_json()["recovered"] is False


def test_history_requests_are_rate_limited_per_connection(start_server: Any, bus: Bus) -> None:
    server = start(start_server, bus)
    client = server.connect()
    client.send_json_burst([{"type": "history", "channel": "rated", "id": n} for n in range(40)])
    replies = replies_by_id(client, 40)
    refused = [reply for reply in replies.values() if reply["type"] == "error"]
    assert len(refused) == 20 and {reply["code"] for reply in refused} == {429}
    assert "history rate limit (10/s)" in refused[0]["message"]
    time.sleep(0.2)  # two requests' worth of refill, at 10/s
    client.send_json({"type": "history", "channel": "rated"})
    assert client.recv_json()["type"] == "history"


# 4 and 5 ------------------------------------------------------------------------------

class Bystander(threading.Thread):
    """Publishes to its own channel (with ids) and subscribes to it, while others read."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.publisher, self.listener = server.connect(), server.connect()
        self.listener.send_json({"type": "subscribe", "channel": "news"})
        assert self.listener.recv_json()["type"] == "subscribed"
        self.server = server
        self.acknowledged: set[int] = set()
        self.refused: list[dict[str, Any]] = []
        self.not_ready = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            self.publisher.publish("news", n, id=n)
            reply = replies_by_id(self.publisher, 1)[n]
            if reply["type"] == "published":
                self.acknowledged.add(n)
            else:
                self.refused.append(reply)
            if self.server.get("/ready")[0] != 200:
                self.not_ready += 1
            n += 1
            time.sleep(0.01)

    def received(self) -> set[int]:
        received: set[int] = set()
        self.listener.sock.settimeout(2)
        try:
            while not self.acknowledged <= received:
                received.add(self.listener.recv_json()["data"])
        except (TimeoutError, ConnectionError):
            pass
        return received


def test_history_answers_cannot_cut_the_worker_off_redis(start_server: Any,
                                                         redis_server: RedisServer) -> None:
    """A burst of reads of a full channel (6 MB each before, and Redis's pub/sub output
    limit is 32 MB): Redis keeps the worker's subscribing connection, and every
    acknowledged publish of a bystander reaches its subscriber."""
    server = start(start_server, Bus("redis", redis_server), "--max-buffer", str(16 << 20))
    fill(server, "full", 100)
    bystander = Bystander(server)
    bystander.start()
    readers = [server.connect(receive_buffer=4096) for _ in range(8)]
    for reader in readers:  # and never read
        reader.send_json_burst([{"type": "history", "channel": "full"}] * 10)
    time.sleep(3)  # the bystander publishes meanwhile
    bystander.stopping.set()
    bystander.join()
    received = bystander.received()
    print(f"\n[redis] {len(bystander.acknowledged)} acknowledged, "
          f"{len(bystander.acknowledged - received)} lost, {len(bystander.refused)} refused")
    assert bystander.acknowledged and bystander.acknowledged <= received
    assert "redis down" not in server.log()


def test_history_reads_do_not_starve_publishing(start_server: Any,
                                                redis_server: RedisServer) -> None:
    """5,000 reads at once (250 connections, 20 each), and a bystander's 100 publishes
    behind them: every read is answered in turn, and the publishes and /ready do not wait
    for a connection behind them (redis-py's pool of 100 answered "Too many connections")."""
    server = start(start_server, Bus("redis", redis_server))
    fill(server, "read", 3, "small")
    readers = [server.connect() for _ in range(250)]
    bystander = server.connect()
    for reader in readers:
        reader.send_json_burst([{"type": "history", "channel": "read", "limit": 3}] * 20)
    for n in range(100):
        bystander.publish("news", n, id=n)
    ready = server.get("/ready")[0]
    published = replies_by_id(bystander, 100)
    refused = [reply for reply in published.values() if reply["type"] != "published"]
    errors = []
    for reader in readers:
        for _ in range(20):
            reply = reader.recv_json()
            if reply["type"] == "error":
                errors.append(reply["code"])
    print(f"\n[redis] 5000 reads: {5000 - len(errors)} answered, {len(errors)} refused "
          f"({sorted(set(errors))}); bystander: {100 - len(refused)} of 100 published, "
          f"/ready {ready}")
    assert not errors and not refused and ready == 200


# 6 ------------------------------------------------------------------------------------

def test_a_history_answer_respects_max_buffer(start_server: Any, bus: Bus) -> None:
    """30 connections that each ask for a full channel's history and never read hold what
    --max-buffer (1 MiB) lets them, not the whole answer; a reading client pages through
    it with `since`."""
    server = start(start_server, bus)
    fill(server, "full", 100)
    before = rss_kib(server)
    silent = [server.connect(receive_buffer=4096) for _ in range(30)]
    for client in silent:
        client.send_json({"type": "history", "channel": "full", "limit": 100})
    time.sleep(1)  # (nothing to wait on: the answers are queued or refused at once)
    grown = rss_kib(server) - before
    print(f"\n[{bus.name}] 30 silent readers of a 6 MB history: workers grew "
          f"{grown / 1024:.1f} MiB")
    assert grown < 30 * 1024
    reader = server.connect()
    offsets: list[int] = []
    since = 0
    while len(offsets) < 100:
        reader.send_json({"type": "history", "channel": "full", "since": since})
        page = [m["offset"] for m in reader.recv_json()["data"]["messages"]]
        assert page and len(page) < 100
        offsets += page
        since = page[-1]
    assert offsets == list(range(1, 101))
