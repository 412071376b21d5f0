"""Overload: a server behind its output slows its publishers, never the subscribers that
read (issue #31). Offered far above what one worker writes; nothing here is timed."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import redis
from support.processes import loadgen
from support.redis import RedisServer
from support.server import token
from support.waiting import wait_for

pytestmark = pytest.mark.slow  # a few seconds of flooding

SUBSCRIBERS = 300
PUBLISHES_PER_S = 20_000  # x 300 subscribers: 6M deliveries/s, several times one worker's
MESSAGES = 20_000  # through Redis, as fast as a pipeline sends them


def subscribers(port: int, channel: str, seconds: float) -> subprocess.Popen[str]:
    """The C load generator's subscribers (it reads as fast as it can), subscribed once it
    says `ready`, counting for `seconds` after `go` and until 6 s of quiet (a server starved
    of CPU by other processes may pause that long)."""
    return subprocess.Popen(
        [str(loadgen()), "--port", str(port), "--path", f"/?token={token()}",
         "--subs", str(SUBSCRIBERS), "--rate", "0", "--sync", "1", "--channel", channel,
         "--duration", str(seconds), "--drain", "6"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def publish_flood(port: int, channel: str, seconds: float) -> dict[str, Any]:
    """One publisher offering PUBLISHES_PER_S for `seconds`, as fast as the server reads."""
    result = subprocess.run(
        [str(loadgen()), "--port", str(port), "--path", f"/?token={token()}", "--subs", "0",
         "--rate", str(PUBLISHES_PER_S), "--duration", str(seconds), "--channel", channel,
         "--drain", "0"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_a_saturated_server_keeps_every_reading_subscriber_and_cuts_a_stalled_one(
        start_server: Any) -> None:
    """With a --max-buffer of 64 KiB, a server behind used to count its own backlog as
    its subscribers' slowness and close them (4008); now it holds the publisher's input
    back instead: every subscriber that reads stays and gets every message, while one that
    does not read at all is still cut."""
    server = start_server("--max-buffer", "65536", "--max-backlog", str(4 << 20),
                          "--publish-rate", "100000000", "--ping-interval", "120",
                          "--ping-timeout", "240")
    readers = subscribers(server.port, "flood", seconds=3)
    try:
        assert readers.stdout is not None and readers.stdin is not None
        assert json.loads(readers.stdout.readline())["ready"]
        stalled = server.connect(receive_buffer=4096).subscribe("flood")  # never reads
        readers.stdin.write("go\n")
        readers.stdin.flush()
        sent = publish_flood(server.port, "flood", seconds=3)["sent"]
        out, err = readers.communicate(timeout=120)
    finally:
        if readers.poll() is None:
            readers.kill()
    assert readers.returncode == 0, err  # "server closed a subscriber" exits 1
    report = json.loads(out)
    assert report["delivered"] == sent * SUBSCRIBERS, report  # nothing lost, nobody cut
    assert report["reordered"] == 0
    figures = server.metrics()
    assert figures["fastfan_inputs_held_total"] > 0  # it was behind: the test saw overload
    assert wait_for(lambda: server.metrics()["fastfan_slow_consumers_disconnected_total"] == 1)
    assert server.metrics()["fastfan_backlog_bytes"] == 0  # all written once it is over
    del stalled


def test_redis_input_is_shed_per_channel_newest_kept_and_each_subscriber_told(
        start_server: Any, redis_server: RedisServer) -> None:
    """Redis disconnects a subscriber that stops reading, so what comes from it while the
    server is behind cannot be held back: each channel keeps its newest message, and its
    subscribers get `lagged` with how many they missed before it. Nothing is lost
    without a word: what a reader received plus what it was told it missed is everything,
    in order, ending with the last message published."""
    node = start_server("--redis", redis_server.url, "--max-backlog", str(256 << 10),
                        "--max-buffer", str(64 << 20), "--ping-interval", "120",
                        "--ping-timeout", "240")
    node.wait_ready()
    readers = subscribers(node.port, "flood", seconds=1)
    try:
        assert readers.stdout is not None and readers.stdin is not None
        assert json.loads(readers.stdout.readline())["ready"]
        watcher = node.connect().subscribe("flood")
        wait_for(lambda: redis_server.subscribers("flood") == 1)
        readers.stdin.write("go\n")
        readers.stdin.flush()
        with redis.Redis(port=redis_server.port) as backend:
            for start in range(0, MESSAGES, 1000):
                pipe = backend.pipeline(transaction=False)
                for seq in range(start, start + 1000):
                    pipe.publish("fastfan:flood", json.dumps(
                        {"type": "message", "channel": "flood", "data": {"seq": seq}}))
                pipe.execute()
        received, missed = [], 0
        while not received or received[-1] != MESSAGES - 1:
            event = watcher.recv_json()
            if event["type"] == "lagged":
                assert event["channel"] == "flood"
                missed += event["missed"]
            else:
                received.append(event["data"]["seq"])
        out, err = readers.communicate(timeout=120)
    finally:
        if readers.poll() is None:
            readers.kill()
    assert readers.returncode == 0, err  # no subscriber closed
    assert missed > 0  # the server was behind: some were shed
    assert received == sorted(received) and len(received) + missed == MESSAGES
    shed = node.metrics()['fastfan_dropped_total{reason="overload"}']
    assert shed == missed  # each shed message counted once (one node, one channel)
    assert json.loads(out)["lost"] == missed * SUBSCRIBERS  # each fast reader: the same
