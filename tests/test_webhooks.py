"""Webhooks (--webhook-url): each event once per transition across the deployment (one
worker, three workers on the embedded bus, two nodes on Redis), the vacated delay, a
receiver that fails then recovers, the signature, the queue's bound. The receiver is a
real HTTP server (aiohttp.web) in a thread of the test."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.redis import Cluster, RedisServer
from support.server import Server, kill
from support.waiting import wait_for
from support.wire import RawClient, free_port
from support.workers import every, place
from test_reload import reload

from fastfan.bus.mesh.bus import SETTLE
from fastfan.webhooks import SIGNATURE_HEADER, verify

WEBHOOK_SECRET = "webhook-secret"


class Receiver:
    """An HTTP server taking webhook requests: it checks each one's signature and keeps
    the events of those it accepts; while `failing`, it answers 500."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.events: list[dict[str, Any]] = []
        self.signed: list[bool] = []
        self.headers: list[dict[str, str]] = []
        self.attempts = 0
        self.failing = False
        self.hanging = False  # answers nothing, for as long as it is set
        self.secret = WEBHOOK_SECRET  # what `signed` checks the requests against
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(5)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/hook", self._take)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        started.set()
        self.loop.run_forever()

    async def _take(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts += 1
        while self.hanging:
            await asyncio.sleep(0.05)
        if self.failing:
            return web.Response(status=500)
        self.signed.append(verify(body, request.headers, self.secret))
        self.headers.append(dict(request.headers))
        self.events += json.loads(body)["events"]
        return web.Response(status=204)

    def unique(self) -> list[dict[str, Any]]:
        """The events, each id once (a retry may bring one twice), in arrival order."""
        seen: set[str] = set()
        return [event for event in self.events
                if not (event["id"] in seen or seen.add(event["id"]))]

    def names(self, channel: str | None = None) -> list[tuple[str, ...]]:
        return [tuple(str(event[key]) for key in ("name", "channel", "user") if key in event)
                for event in self.unique() if channel is None or event.get("channel") == channel]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def receiver() -> Any:
    made = Receiver()
    yield made
    made.stop()


def webhook_args(receiver: Receiver, *more: str) -> tuple[str, ...]:
    return ("--webhook-url", receiver.url, "--webhook-secret", WEBHOOK_SECRET, *more)


def quiet(receiver: Receiver, seconds: float = 0.7) -> list[tuple[str, ...]]:
    """The events once none has come for `seconds` (what the absence of a duplicate takes)."""
    last = [len(receiver.events), time.monotonic()]

    def settled() -> bool:
        if len(receiver.events) != last[0]:
            last[:] = [len(receiver.events), time.monotonic()]
        return time.monotonic() - last[1] >= seconds

    wait_for(settled, timeout=30)
    return receiver.names()


def test_each_event_once_with_one_worker(start_server: Any, receiver: Receiver) -> None:
    server = start_server(*webhook_args(receiver, "--webhook-vacated-delay", "0",
                                        "--webhook-publish", "chat.*",
                                        "--webhook-connections", "on"))
    alice = server.connect("alice").subscribe("room")
    alice_again = server.connect("alice").subscribe("room")
    bob = server.connect("bob").subscribe("room")
    bob.publish("chat.1", {"text": "hi"})
    bob.publish("other", {"text": "not sent"})
    bob.send_frame(0x8, b"\x03\xe8bye")  # CLOSE 1000 "bye"
    bob.recv_close()
    alice.close()  # dropped: 1006
    wait_for(lambda: len(receiver.names()) >= 6)
    alice_again.close()
    expected = [("channel_occupied", "room"), ("member_added", "room", "alice"),
                ("member_added", "room", "bob"), ("client_publish", "chat.1", "bob"),
                ("member_removed", "room", "bob"), ("connection_closed", "bob"),
                ("connection_closed", "alice"), ("member_removed", "room", "alice"),
                ("channel_vacated", "room"), ("connection_closed", "alice")]
    wait_for(lambda: len(receiver.names()) >= len(expected))
    assert quiet(receiver) == expected
    events = receiver.unique()
    published = next(e for e in events if e["name"] == "client_publish")
    assert published["data"] == {"text": "hi"} and published["client"]
    closed = [(e["code"], e["reason"]) for e in events if e["name"] == "connection_closed"]
    assert closed == [(1000, "bye"), (1006, ""), (1006, "")]
    assert len({e["id"] for e in receiver.events}) == len(receiver.events)
    assert all(receiver.signed)
    assert receiver.headers[0]["Content-Type"] == "application/json"
    assert server.metrics()["fastfan_webhook_events_total"] == len(expected)


def subscribe_everywhere(servers: list[Server], sub: str, channel: str) -> list[RawClient]:
    """A connection of `sub` subscribed to `channel` on every worker of every server."""
    return [client for server in servers
            for client in every(place(server, sub=sub, channels=(channel,)))]


def transitions_once(servers: list[Server], receiver: Receiver) -> None:
    """Users on every worker come and go: one event per transition, whatever the worker."""
    alices = subscribe_everywhere(servers, "alice", "room")
    bob = servers[-1].connect("bob").subscribe("room")
    wait_for(lambda: len(receiver.names()) >= 3)
    for alice in alices:
        alice.close()
    wait_for(lambda: len(receiver.names()) >= 4)
    bob.close()
    expected = [("channel_occupied", "room"), ("member_added", "room", "alice"),
                ("member_added", "room", "bob"), ("member_removed", "room", "alice"),
                ("member_removed", "room", "bob"), ("channel_vacated", "room")]
    wait_for(lambda: len(receiver.names()) >= len(expected), timeout=20)
    assert quiet(receiver) == expected
    # and again: a second filling is a second transition
    again = subscribe_everywhere(servers[:1], "carol", "room")
    wait_for(lambda: Counter(receiver.names())[("channel_occupied", "room")] == 2)
    assert Counter(quiet(receiver))[("channel_occupied", "room")] == 2
    assert again and all(receiver.signed)


def test_each_event_once_across_three_workers(start_server: Any, receiver: Receiver) -> None:
    server = start_server("--workers", "3",
                          *webhook_args(receiver, "--webhook-vacated-delay", "0"))
    server.wait_ready()
    transitions_once([server], receiver)


def test_each_event_once_across_two_nodes_on_redis(start_server: Any, receiver: Receiver,
                                                   redis_server: RedisServer) -> None:
    args = ("--redis", redis_server.url, *webhook_args(receiver, "--webhook-vacated-delay", "0"))
    servers = [start_server(*args, "--workers", "2"), start_server(*args)]
    for server in servers:
        server.wait_ready()
    transitions_once(servers, receiver)


def test_each_event_once_across_two_nodes_on_two_redis_shards(
        start_server: Any, receiver: Receiver, tmp_path: Any) -> None:
    shards = [RedisServer(tmp_path / f"redis-{index}.log") for index in range(2)]
    try:
        args = ("--redis", ",".join(shard.url for shard in shards),
                *webhook_args(receiver, "--webhook-vacated-delay", "0"))
        servers = [start_server(*args), start_server(*args)]
        for server in servers:
            server.wait_ready()
        transitions_once(servers, receiver)
    finally:
        for shard in shards:
            shard.kill()


def test_each_event_once_across_two_nodes_on_a_redis_cluster(
        start_server: Any, receiver: Receiver, cluster: Cluster) -> None:
    args = ("--redis", cluster.url, *webhook_args(receiver, "--webhook-vacated-delay", "0"))
    servers = [start_server(*args), start_server(*args)]
    for server in servers:
        server.wait_ready(timeout=30)
    transitions_once(servers, receiver)


def test_a_dead_workers_clients_are_removed_by_the_others(start_server: Any,
                                                          receiver: Receiver) -> None:
    server = start_server("--workers", "3",
                          *webhook_args(receiver, "--webhook-vacated-delay", "0"))
    server.wait_ready()
    placed = place(server, sub="alice", channels=("room",))
    first, *others = server.workers()
    for pid in others:
        placed[pid][0].close()
    wait_for(lambda: receiver.names()[:2] == [("channel_occupied", "room"),
                                               ("member_added", "room", "alice")])
    os.kill(first, signal.SIGKILL)  # the last subscriber's worker, whichever worker leads
    wait_for(lambda: len(receiver.names()) >= 4)
    assert quiet(receiver)[2:] == [("member_removed", "room", "alice"),
                                   ("channel_vacated", "room")]


def test_the_first_worker_dies_and_comes_back_without_doubles(start_server: Any,
                                                               receiver: Receiver) -> None:
    """Worker 0 leads; it dies, the next one leads, and the new worker 0 takes over again
    once it knows what the others hold: still one event per transition."""
    server = start_server("--workers", "3",
                          *webhook_args(receiver, "--webhook-vacated-delay", "0"))
    server.wait_ready()
    placed = place(server, sub="alice", channels=("room",))
    wait_for(lambda: len(receiver.names()) >= 2)
    first = min(placed)  # forked first: worker 0
    os.kill(first, signal.SIGKILL)  # alice stays on the others: nothing to tell
    wait_for(lambda: len(server.workers()) == 3 and first not in server.workers())
    back_at = time.monotonic()
    server.wait_ready()
    clients = subscribe_everywhere([server], "bob", "room")  # worker 1 still leads
    for held in placed.values():
        held[0].close()
    wait_for(lambda: ("member_removed", "room", "alice") in receiver.names())
    for client in clients:
        client.close()
    expected = [("channel_occupied", "room"), ("member_added", "room", "alice"),
                ("member_added", "room", "bob"), ("member_removed", "room", "alice"),
                ("member_removed", "room", "bob"), ("channel_vacated", "room")]
    wait_for(lambda: len(receiver.names()) >= len(expected), timeout=20)
    assert quiet(receiver) == expected
    wait_for(lambda: time.monotonic() - back_at > SETTLE, timeout=SETTLE + 1)
    clients = subscribe_everywhere([server], "carol", "room")  # the new worker 0 leads
    for client in clients:
        client.close()
    expected += [("channel_occupied", "room"), ("member_added", "room", "carol"),
                 ("member_removed", "room", "carol"), ("channel_vacated", "room")]
    wait_for(lambda: len(receiver.names()) >= len(expected), timeout=20)
    assert quiet(receiver) == expected


def test_a_dead_nodes_clients_are_removed_through_redis(start_server: Any, receiver: Receiver,
                                                        redis_server: RedisServer) -> None:
    args = ("--redis", redis_server.url, "--presence-ttl", "2",
            *webhook_args(receiver, "--webhook-vacated-delay", "0"))
    staying, dying = start_server(*args), start_server(*args)
    for server in (staying, dying):
        server.wait_ready()
    held = dying.connect("alice").subscribe("room")
    wait_for(lambda: len(receiver.names()) >= 2)
    kill(dying)  # master and workers: nothing is withdrawn, the others must find out
    killed_at = time.monotonic()
    wait_for(lambda: len(receiver.names()) >= 4, timeout=15)
    assert time.monotonic() - killed_at < 2 + 3  # within the TTL and a heartbeat or two
    assert receiver.names()[2:] == [("member_removed", "room", "alice"),
                                    ("channel_vacated", "room")]
    held.close()


def test_a_redis_that_forgets_is_told_again_who_holds_what(
        start_server: Any, receiver: Receiver, redis_server: RedisServer) -> None:
    server = start_server("--redis", redis_server.url,
                          *webhook_args(receiver, "--webhook-vacated-delay", "0"))
    server.wait_ready()
    client = server.connect("alice").subscribe("room")
    joined = [("channel_occupied", "room"), ("member_added", "room", "alice")]
    wait_for(lambda: receiver.names() == joined)
    redis_server.command("FLUSHALL")  # as a restart without persistence
    wait_for(lambda: receiver.names() == joined * 2)  # written again, told again
    client.close()
    left = [("member_removed", "room", "alice"), ("channel_vacated", "room")]
    wait_for(lambda: receiver.names() == joined * 2 + left)


def test_vacated_waits_and_is_forgotten_if_the_channel_fills_again(
        start_server: Any, receiver: Receiver) -> None:
    server = start_server(*webhook_args(receiver, "--webhook-vacated-delay", "1",
                                        "--presence-channels", "presence.*"))
    client = server.connect("alice").subscribe("room")
    wait_for(lambda: receiver.names() == [("channel_occupied", "room")])
    client.close()
    back = server.connect("alice").subscribe("room")  # a reconnect within the delay: no pair
    assert quiet(receiver, 1.5) == [("channel_occupied", "room")]
    client = server.connect("bob").subscribe("other")
    client.close()
    left_at = time.monotonic()
    wait_for(lambda: ("channel_vacated", "other") in receiver.names())
    assert time.monotonic() - left_at >= 0.9
    assert receiver.names() == [("channel_occupied", "room"), ("channel_occupied", "other"),
                                ("channel_vacated", "other")]
    back.close()


def test_a_receiver_that_fails_then_recovers_gets_every_event_in_order(
        start_server: Any, receiver: Receiver) -> None:
    receiver.failing = True
    server = start_server(*webhook_args(receiver, "--webhook-vacated-delay", "0",
                                        "--webhook-batch", "3"))
    for _ in range(3):
        clients = [server.connect(f"user{i}").subscribe(f"room{i}", "lobby") for i in range(3)]
        for client in clients:
            client.close()
        wait_for(lambda: server.metrics()["fastfan_channels"] == 0)  # gone before the next
    wait_for(lambda: server.metrics()["fastfan_webhook_failures_total"] >= 3)
    receiver.failing = False
    # 3 rounds, each: 3 rooms and the lobby filled and emptied, 3 users in each
    wait_for(lambda: len(receiver.unique()) == 3 * (4 * 2 + 6 * 2), timeout=30)
    for channel in ("room0", "room1", "room2", "lobby"):
        names = [name for name, *_ in receiver.names(channel)]
        occupancy = [name for name in names if name.startswith("channel_")]
        assert occupancy == ["channel_occupied", "channel_vacated"] * 3, channel
        # a member is added before it is removed, every time
        users = Counter[str]()
        for name, _, user in (n for n in receiver.names(channel) if len(n) == 3):
            users[user] += 1 if name == "member_added" else -1
            assert users[user] in (0, 1), (channel, receiver.names(channel))
    assert all(receiver.signed)
    assert server.metrics()["fastfan_webhook_dropped_total"] == 0


def test_every_url_gets_every_event_a_failing_one_holding_back_no_other(
        start_server: Any, receiver: Receiver) -> None:
    failing = Receiver()
    failing.failing = True
    try:
        server = start_server("--webhook-url", f"{failing.url},{receiver.url}",
                              "--webhook-secret", WEBHOOK_SECRET,
                              "--presence-channels", "none")
        client = server.connect("alice").subscribe("a", "b")
        expected = [("channel_occupied", "a"), ("channel_occupied", "b")]
        wait_for(lambda: receiver.names() == expected)
        assert failing.attempts >= 1 and not failing.events
        failing.failing = False
        wait_for(lambda: failing.names() == expected)
        assert [e["id"] for e in failing.unique()] == [e["id"] for e in receiver.unique()]
        client.close()
    finally:
        failing.stop()


def test_the_queue_is_bounded_in_bytes(start_server: Any, receiver: Receiver) -> None:
    receiver.failing = True
    server = start_server(*webhook_args(receiver, "--webhook-queue-bytes", "2000",
                                        "--presence-channels", "none"))
    clients = [server.connect("alice") for _ in range(4)]
    for index in range(200):
        clients[index % 4].subscribe(f"channel-{index:03d}")
    wait_for(lambda: server.metrics()["fastfan_webhook_dropped_total"] > 100)
    assert server.log().count("events for") >= 1  # logged, once a minute at most
    receiver.failing = False
    wait_for(lambda: ("channel_occupied", "channel-199") in receiver.names())
    delivered = quiet(receiver)
    dropped = server.metrics()["fastfan_webhook_dropped_total"]
    assert 0 < len(delivered) < 200 and len(delivered) + dropped == 200
    assert ("channel_occupied", "channel-000") not in delivered  # the oldest went


def test_an_event_not_taken_within_the_retry_time_is_dropped_never_late(
        start_server: Any, receiver: Receiver) -> None:
    receiver.failing = True
    server = start_server(*webhook_args(receiver, "--webhook-retry", "1",
                                        "--presence-channels", "none"))
    client = server.connect("alice").subscribe("old")
    wait_for(lambda: server.metrics()["fastfan_webhook_dropped_total"] == 1)
    assert server.metrics()["fastfan_webhook_failures_total"] >= 2
    receiver.failing = False
    client.subscribe("new")
    wait_for(lambda: receiver.names() == [("channel_occupied", "new")])
    assert quiet(receiver) == [("channel_occupied", "new")]
    client.close()


def test_a_receiver_that_hangs_does_not_hold_up_messages(start_server: Any,
                                                         receiver: Receiver) -> None:
    receiver.hanging = True
    server = start_server(*webhook_args(receiver, "--webhook-publish", "*"))
    subscriber = server.connect("alice").subscribe("room")
    publisher = server.connect("bob")
    wait_for(lambda: receiver.attempts >= 1)  # a request hangs: every event waits behind it
    started = time.monotonic()
    for index in range(200):
        publisher.publish("room", index)
    assert [subscriber.recv_json()["data"] for _ in range(200)] == list(range(200))
    assert time.monotonic() - started < 2
    receiver.hanging = False
    wait_for(lambda: len([n for n in receiver.names() if n[0] == "client_publish"]) == 200)
    subscriber.close()
    publisher.close()


def test_verify_checks_the_body_and_the_secret() -> None:
    from fastfan.webhooks import sign

    body = b'{"time_ms":1,"events":[]}'
    headers = {SIGNATURE_HEADER.lower(): sign(body, WEBHOOK_SECRET)}
    assert headers[SIGNATURE_HEADER.lower()].startswith("sha256=")
    assert verify(body, headers, WEBHOOK_SECRET)
    assert not verify(body + b" ", headers, WEBHOOK_SECRET)
    assert not verify(body, headers, "another secret")
    assert not verify(body, {}, WEBHOOK_SECRET)


def test_the_pusher_format_needs_a_pusher_app(receiver: Receiver) -> None:
    """Its events are signed with each app's secret (tests/test_pusher.py has them)."""
    done = subprocess.run([sys.executable, "-m", "fastfan", "run", "--insecure",
                           "--port", str(free_port()),
                           *webhook_args(receiver, "--webhook-format", "pusher")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "--webhook-format pusher needs --pusher-app" in done.stderr


def test_a_webhook_url_needs_a_secret() -> None:
    done = subprocess.run([sys.executable, "-m", "fastfan", "run", "--insecure", "--port",
                           str(free_port()), "--webhook-url", "http://127.0.0.1:1/"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--webhook-secret" in done.stderr



def test_a_reload_changes_the_urls_secret_and_options_on_every_worker(
        tmp_path: Path, start_server: Any) -> None:
    first, second = Receiver(), Receiver()
    try:
        config, pid_file = tmp_path / "fastfan.toml", tmp_path / "fastfan.pid"
        config.write_text(f'webhook_url = "{first.url}"\nwebhook_secret = "{WEBHOOK_SECRET}"\n'
                          'webhook_publish = "chat.*"\nworkers = 2\n')
        server = start_server("--config", str(config), "--pid-file", str(pid_file))
        server.wait_ready()
        clients = every(place(server, 1, "bob"))
        for client in clients:
            client.publish("chat.1", "before")
        wait_for(lambda: first.names().count(("client_publish", "chat.1", "bob")) == 2)
        second.secret = "the-rotated-webhook-secret"
        config.write_text(f'webhook_url = "{second.url}"\nwebhook_secret = "{second.secret}"\n'
                          'webhook_publish = "news.*"\nworkers = 2\n')
        reload(server, pid_file)
        wait_for(lambda: server.log().count("reloaded") == 2)
        assert "reload: webhook_url, webhook_secret, webhook_publish" in server.log()
        for client in clients:  # the same connections, on each worker
            client.publish("chat.1", "after")
            client.publish("news.1", "after")
        wait_for(lambda: second.names().count(("client_publish", "news.1", "bob")) == 2)
        assert quiet(second) == [("client_publish", "news.1", "bob")] * 2
        assert second.signed == [True] * len(second.signed)
        assert first.names() == [("client_publish", "chat.1", "bob")] * 2
    finally:
        first.stop()
        second.stop()
