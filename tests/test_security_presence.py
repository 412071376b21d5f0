"""Presence and join/leave cost the server what their requests are worth, not the size of a
channel or the number of its watchers per request (issue #25, findings 7, 8, 9 and 19)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from support.processes import children, process_holding
from support.redis import RedisServer
from support.server import Server, token
from support.waiting import wait_for
from support.wire import RawClient

BUSES = ["one worker", "two workers", "redis"]
INFO = "x" * 1000  # near the 1 KiB an `info` claim may take


@contextmanager
def servers_on(bus: str, start_server: Any, tmp_path: Path,
               *args: str) -> Iterator[tuple[Server, RedisServer | None]]:
    """A server on `bus` (with Redis: its redis-server too)."""
    redis = RedisServer(tmp_path / "redis.log") if bus == "redis" else None
    try:
        if redis is not None:
            server = start_server("--redis", redis.url, *args)
        else:
            server = start_server(*(("--workers", "2") if bus == "two workers" else ()), *args)
        server.wait_ready()
        yield server, redis
    finally:
        if redis is not None:
            redis.kill()


def client(server: Server, user: str, **claims: Any) -> tuple[RawClient, str]:
    connected = RawClient(server.host, server.port, f"/?token={token(user, **claims)}")
    return connected, connected.recv_json()["data"]["clientId"]


def replies(connected: RawClient, count: int) -> list[dict[str, Any]]:
    return [connected.recv_json() for _ in range(count)]


def read_until_pong(connected: RawClient) -> list[dict[str, Any]]:
    """What comes before the answer to a ping sent now."""
    connected.send_json({"type": "ping", "id": "until"})
    seen = []
    while (reply := connected.recv_json()) != {"type": "pong", "id": "until"}:
        seen.append(reply)
    return seen


def worker_of(server: Server, connected: RawClient) -> int:
    pid = process_holding(connected.sock.getsockname()[1], children(server.process.pid))
    assert pid is not None
    return pid


def bytes_read_by(pid: int) -> int:
    """What a process has read from its file descriptors (sockets included), ever."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def members(server: Server, count: int, channel: str = "room") -> list[RawClient]:
    """`count` subscribers of `channel`, each a user of its own with a 1 KiB info."""
    joined = []
    for n in range(count):
        member, _ = client(server, f"member{n}", info=INFO)
        member.send_json({"type": "subscribe", "channel": channel})
        joined.append(member)
    for member in joined:
        assert member.recv_json()["type"] == "subscribed"
    return joined


# Finding 7: join/leave was an unmetered publish --------------------------------------


@pytest.mark.parametrize("bus", BUSES)
def test_subscribes_are_rate_limited_past_a_connect_s_worth(start_server: Any, tmp_path: Path,
                                                           bus: str) -> None:
    """A client takes its 1,000 channels at once at connect; past --max-subscriptions'
    worth, subscribe/unsubscribe toggles are refused at --subscribe-rate."""
    with servers_on(bus, start_server, tmp_path) as (server, _):
        toggler, _ = client(server, "toggler", info=INFO)
        channels = [f"c{n}" for n in range(1000)]
        toggler.send_json_burst([{"type": "subscribe", "channel": c} for c in channels])
        assert [reply["type"] for reply in replies(toggler, 1000)] == ["subscribed"] * 1000
        toggles = 500
        toggler.send_json_burst([request for _ in range(toggles) for request in (
            {"type": "subscribe", "channel": "room"},
            {"type": "unsubscribe", "channel": "room"})])
        answered = replies(toggler, 2 * toggles)
        refused = [reply for reply in answered if reply["type"] == "error"]
        assert refused and {(r["code"], r["message"]) for r in refused} == {
            (429, "subscribe rate limit (20/s) exceeded")}
        # the bucket's 24 tokens left, and what 20/s refilled meanwhile
        assert len(refused) >= toggles - 24 - 20 * 2


@pytest.mark.parametrize("bus", BUSES)
def test_a_join_and_leave_in_one_turn_reach_no_watcher(start_server: Any, tmp_path: Path,
                                                      bus: str) -> None:
    """A subscribe and unsubscribe that arrive together cancel out: the watchers, on the
    toggler's worker and the others, hear of neither; a later join still comes."""
    with servers_on(bus, start_server, tmp_path) as (server, redis):
        watchers = []
        places: set[int] = set()
        for _ in range(200):  # a watcher on each worker (and, with Redis, on a second node)
            watcher, _ = client(server, "watcher")
            place = worker_of(server, watcher) if bus == "two workers" else 0
            if place in places:
                watcher.close()
                continue
            places.add(place)
            watchers.append(watcher)
            if len(places) == (2 if bus == "two workers" else 1):
                break
        if redis is not None:
            far = start_server("--redis", redis.url)
            far.wait_ready()
            watchers.append(client(far, "watcher")[0])
        for watcher in watchers:
            watcher.send_json({"type": "subscribe", "channel": "room", "joinLeave": True})
            assert watcher.recv_json()["type"] == "subscribed"
        toggler, toggler_id = client(server, "toggler", info=INFO)
        for _ in range(5):
            toggler.send_json_burst([{"type": "subscribe", "channel": "room"},
                                     {"type": "unsubscribe", "channel": "room"}])
            assert [r["type"] for r in replies(toggler, 2)] == ["subscribed", "unsubscribed"]
        toggler.subscribe("room")  # a turn of its own: this join is told
        for watcher in watchers:
            event = watcher.recv_json()
            while event["data"]["user"] == "watcher":  # the other watchers' joins
                event = watcher.recv_json()
            assert (event["type"], event["data"]["clientId"]) == ("join", toggler_id)
            assert read_until_pong(watcher) == []


# Finding 8: repeated subscribes while the bus has not confirmed ------------------------




@contextmanager
def bus_away(server: Server, redis: RedisServer | None, bus: str,
             subscriber: RawClient) -> Iterator[int]:
    """The bus cannot confirm subscriptions meanwhile: Redis killed, or (two workers) the
    worker not holding `subscriber` stopped; back at the end. Yields the pid of the worker
    that holds `subscriber`."""
    pid = worker_of(server, subscriber) if bus == "two workers" else children(
        server.process.pid)[0]
    stopped = [p for p in children(server.process.pid) if p != pid]
    if redis is not None:
        redis.kill()
    else:
        os.kill(stopped[0], signal.SIGSTOP)
    try:
        yield pid
    finally:
        if redis is not None:
            redis.start()
        else:
            os.kill(stopped[0], signal.SIGCONT)


@pytest.mark.parametrize("bus", ["two workers", "redis"])
def test_repeated_subscribes_while_the_bus_is_away_hold_one_reply(
        start_server: Any, tmp_path: Path, bus: str) -> None:
    """While the bus cannot confirm a subscription (Redis down, another worker stopped),
    repeating the subscribe adds nothing: each repeat is refused at once, the worker does
    not grow by the repeats' ids, and the first `subscribed` comes once the bus is back."""
    with servers_on(bus, start_server, tmp_path) as (server, redis):
        subscriber, _ = client(server, "subscriber")
        with bus_away(server, redis, bus, subscriber) as pid:
            big_id = "i" * 20_000
            subscriber.send_json({"type": "subscribe", "channel": "room", "id": "first"})
            before = rss_kib(pid)
            for batch in range(150):  # (the error replies, ids and all, within --max-buffer)
                subscriber.send_json_burst([{"type": "subscribe", "channel": "room",
                                             "id": f"{big_id}{batch}-{n}"} for n in range(20)])
                for reply in replies(subscriber, 20):
                    assert (reply["type"], reply["code"]) == ("error", 400), reply
                    assert reply["message"].startswith("already subscribing to room")
            grown = rss_kib(pid) - before
            assert grown < 20_000, f"the worker grew {grown} KiB"  # 3,000 ids: 60 MB
        assert subscriber.recv_json() == {"type": "subscribed", "channel": "room",
                                          "id": "first"}


@pytest.mark.parametrize("bus", ["two workers", "redis"])
def test_the_replies_held_for_the_bus_stay_within_max_buffer(
        start_server: Any, tmp_path: Path, bus: str) -> None:
    """Subscribes to many channels while the bus is away each hold a reply, its id
    included: one connection holds no more than --max-buffer of them, the rest are refused
    (503, try again), and the held ones go out once the bus is back."""
    with servers_on(bus, start_server, tmp_path) as (server, redis):
        subscriber, _ = client(server, "subscriber")
        with bus_away(server, redis, bus, subscriber) as pid:
            big_id = "i" * 20_000
            before = rss_kib(pid)
            refused = []
            for batch in range(30):  # (the refusals echo their ids: read as they come)
                subscriber.send_json_burst([{"type": "subscribe", "channel": f"c{batch}-{n}",
                                             "id": f"{big_id}{batch}-{n}"} for n in range(20)])
                refused += read_until_pong(subscriber)
            assert {(r["code"], r["message"]) for r in refused} == {
                (503, "message bus unavailable, try again")}
            grown = rss_kib(pid) - before
            assert grown < 10_000, f"the worker grew {grown} KiB"  # 600 ids: 12 MB
        held = 600 - len(refused)
        assert 40 <= held <= 1_048_576 // 20_000
        subscriber.sock.settimeout(10)  # Redis reconnects within 2 s
        assert [subscriber.recv_json()["type"] for _ in range(held)] == ["subscribed"] * held


# Findings 9 and 19: presence cost the channel's size per request ----------------------


@pytest.mark.parametrize("bus", BUSES)
def test_presence_requests_are_rate_limited_and_share_one_gather(
        start_server: Any, tmp_path: Path, bus: str) -> None:
    """A burst of presence_stats on a large channel: past the bucket (twice
    --subscribe-rate, 20) they are refused, and those answered cost one gather of the channel
    (one Redis script, or one answer from each other worker), not one each."""
    with servers_on(bus, start_server, tmp_path) as (server, redis):
        _room = members(server, 200)
        asker, _ = client(server, "asker")
        pid = worker_of(server, asker) if bus == "two workers" else 0
        if redis is not None:
            wait_for(lambda: redis.command("HLEN", "{fastfan:room}:presence") == b":200\r\n")
        scripts = redis.command("INFO", "commandstats") if redis is not None else b""
        read = bytes_read_by(pid) if pid else 0
        asked = 1000
        asker.send_json_burst([{"type": "presence_stats", "channel": "room"}] * asked)
        answered = replies(asker, asked)
        counted = [reply for reply in answered if reply["type"] == "presence_stats"]
        refused = [reply for reply in answered if reply["type"] == "error"]
        assert {(r["code"], r["message"]) for r in refused} == {
            (429, "presence rate limit (20/s) exceeded")}
        assert 40 <= len(counted) < 100 and len(refused) == asked - len(counted)
        assert {(r["data"]["count"], r["data"]["users"]) for r in counted} == {(200, 200)}
        if redis is not None:
            calls_before = evalsha_calls(scripts)
            assert evalsha_calls(redis.command("INFO", "commandstats")) - calls_before <= 5
        if pid:  # the other worker's ~100 members, 1 KiB each, once: not 1,000 times
            assert bytes_read_by(pid) - read < 2_000_000


def evalsha_calls(commandstats: bytes) -> int:
    for line in commandstats.decode().splitlines():
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def test_a_worker_s_presence_answer_is_cut_at_the_limit(start_server: Any) -> None:
    """Each worker sends at most --presence-limit entries of its subscribers, with their
    count and users: the asking worker reads a few KiB, not every member's 1 KiB info (past
    64 MiB the link was dropped, and its joins' false leaves sent)."""
    server = start_server("--workers", "2", "--presence-limit", "5")
    server.wait_ready()
    _room = members(server, 600)
    asker, _ = client(server, "asker")
    pid = worker_of(server, asker)
    read = bytes_read_by(pid)
    asker.send_json({"type": "presence", "channel": "room"})
    data = asker.recv_json()["data"]
    assert (data["count"], data["users"], len(data["clients"]), data["truncated"]) == (
        600, 600, 5, True)
    # not the other worker's half of the members, about 300 KiB
    assert bytes_read_by(pid) - read < 100_000


def test_presence_gathers_never_take_the_connections_publishing_needs(
        start_server: Any, redis_server: RedisServer) -> None:
    """Thousands of presence requests on distinct channels at once, each a Redis read: a
    bystander's acknowledged publishes still go through (the gathers read on a pool of
    their own; on the publishing pool they made publishes 503, issue #25, finding 5)."""
    server = start_server("--redis", redis_server.url)
    server.wait_ready()
    askers = [client(server, f"asker{n}")[0] for n in range(100)]
    bystander, _ = client(server, "bystander")
    for n, asker in enumerate(askers):
        asker.send_json_burst([{"type": "presence_stats", "channel": f"room{n}-{k}"}
                               for k in range(40)])  # within the bucket: all are asked
    bystander.send_json_burst([{"type": "publish", "channel": "news", "data": n, "id": n}
                               for n in range(50)])
    answers = replies(bystander, 50)
    assert [answer["type"] for answer in answers] == ["published"] * 50, answers[:3]
    for asker in askers:  # every request answered: its stats, or 503 for a moment
        assert {reply["type"] for reply in replies(asker, 40)} <= {"presence_stats", "error"}


def test_a_presence_gather_through_a_stalled_redis_ends_with_503(
        start_server: Any, redis_server: RedisServer) -> None:
    """Redis stops answering (SIGSTOP): a presence request gets 503 within the gathers'
    deadline (2 s; other mechanisms took 5 s), and the next one on the channel is answered
    too, not left behind the first (one gather per channel serves those meanwhile)."""
    server = start_server("--redis", redis_server.url)
    server.wait_ready()
    asker, _ = client(server, "asker")
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        asker.sock.settimeout(3.5)  # the deadline and a margin: a deadline, not a speed
        for n in range(2):
            asker.send_json({"type": "presence", "channel": "room", "id": n})
            reply = asker.recv_json()
            assert (reply["type"], reply["code"], reply["id"]) == ("error", 503, n), reply
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
