"""The server API's `channels` and `info`, and the status page's busiest channels, for the
whole deployment: every worker (the embedded bus) and every node (Redis)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
from support.api import (
    assert_error,
    call,
    channels,
    name_of,
    nodes,
    start_api,
    status_json,
    two_nodes_add_up,
)
from support.processes import children
from support.redis import RedisServer
from support.waiting import wait_for
from support.workers import every, place


@pytest.mark.slow
def test_channels_and_info_add_up_every_worker(start_server: Any) -> None:
    server, port = start_api(start_server, "--workers", "2")
    alice = place(server, 2, "alice", ("room.1", "lobby"))  # both channels on both workers
    bob = server.connect("bob").subscribe("room.2")       # one channel on one worker
    assert len(every(alice)) >= 4
    expected = {"room.1": len(every(alice)), "lobby": len(every(alice)), "room.2": 1}
    # whichever worker answers, it counts every worker's subscribers
    for _ in range(6):
        assert channels(port) == expected
        assert channels(port, "room.*") == {"room.1": len(every(alice)), "room.2": 1}
        assert channels(port, "nothing*") == {}
    described = wait_for(lambda: (n := nodes(port)) and n[name_of(server)]["connections"]
                         == len(every(alice)) + 1 and n)
    assert list(described) == [name_of(server)]
    node = described[name_of(server)]
    assert (node["workers"], node["subscriptions"]) == (2, 2 * len(every(alice)) + 1)
    assert 0 <= node["uptime"] < 60
    bob.close()
    wait_for(lambda: "room.2" not in channels(port))


@pytest.mark.slow
def test_a_worker_killed_owes_no_answer(start_server: Any) -> None:
    """A worker that dies takes its subscribers out of `channels` (it owes no answer), and
    its replacement answers again."""
    server, port = start_api(start_server, "--workers", "2")
    placed = place(server, 2, "alice", ("room",))
    victim, survivor = list(placed)
    os.kill(victim, signal.SIGKILL)

    def answered() -> dict[str, int] | None:
        try:
            return channels(port)
        except OSError:  # the call went to the worker as it died
            return None

    wait_for(lambda: answered() == {"room": len(placed[survivor])}, timeout=10)
    replaced = wait_for(lambda: (pids := children(server.process.pid)) and len(pids) == 2
                        and victim not in pids, timeout=10)
    assert replaced
    newcomer = place(server, 1, "bob", ("lobby",))  # on both workers, the new one too
    expected = {"room": len(placed[survivor]), "lobby": len(every(newcomer))}
    for _ in range(6):
        assert channels(port) == expected


@pytest.mark.slow
def test_the_status_page_lists_the_busiest_channels_of_every_worker(
        start_server: Any) -> None:
    server, port = start_api(start_server, "--workers", "2")
    placed = place(server, 2, "alice", ("news",))
    bob = server.connect("bob").subscribe("sports")
    for _ in range(6):  # whichever worker answers
        document = status_json(port)
        assert document["channels_everywhere"] is True
        assert document["channels"] == [{"channel": "news", "subscribers": len(every(placed))},
                                        {"channel": "sports", "subscribers": 1}]
    bob.close()


@pytest.mark.slow
def test_a_bad_channels_body_is_400(start_server: Any) -> None:
    _, port = start_api(start_server, "--workers", "2")
    for body in (b"[", b'{"pattern":3}', b"[]"):
        status, answer = call(port, "channels", raw=body)
        assert status == 400, body
        assert_error(answer, 400, "bad body")
    status, answer = call(port, "info", raw=b"{")
    assert status == 400


@pytest.mark.slow
def test_channels_and_info_across_nodes(start_server: Any, redis_server: RedisServer) -> None:
    near, port, far, far_count, alice = two_nodes_add_up(start_server, redis_server.url)
    # The far node dies without a word (master and workers killed): it leaves `info`
    # within a few seconds, and `channels` answers 503 until then, never a wrong figure.
    workers = children(far.process.pid)
    far.process.send_signal(signal.SIGKILL)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    while len(nodes(port)) == 2:
        status, answer = call(port, "channels")
        assert status == 503 or answer["result"]["channels"] == {
            "room": far_count + 1, "far.only": far_count}, answer
        assert time.monotonic() - started < 10
    assert list(nodes(port)) == [name_of(near)]
    assert channels(port) == {"room": 1}
    alice.close()


@pytest.mark.slow
def test_a_node_that_stops_leaves_info_at_once(
        start_server: Any, redis_server: RedisServer) -> None:
    near, port = start_api(start_server, "--redis", redis_server.url)
    far = start_server("--redis", redis_server.url)
    far.wait_ready()
    wait_for(lambda: len(nodes(port)) == 2, timeout=5)
    assert far.stop() == 0
    assert list(nodes(port)) == [name_of(near)]
    assert channels(port) == {}


def test_channels_and_info_answer_503_while_redis_is_down(
        start_server: Any, redis_server: RedisServer) -> None:
    _, port = start_api(start_server, "--redis", redis_server.url)
    assert channels(port) == {}
    redis_server.kill()
    for method in ("channels", "info"):
        status, answer = call(port, method)
        assert status == 503, answer
        assert_error(answer, 503, "try again")
