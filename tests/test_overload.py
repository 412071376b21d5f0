"""Overload: a server behind its output slows its publishers, never the subscribers that
read (issue #31). Offered far above what one worker writes; nothing here is timed."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from support.processes import loadgen
from support.server import token
from support.waiting import wait_for

pytestmark = pytest.mark.slow  # a few seconds of flooding

SUBSCRIBERS = 300
PUBLISHES_PER_S = 20_000  # x 300 subscribers: 6M deliveries/s, several times one worker's


def subscribers(port: int, channel: str, seconds: float) -> subprocess.Popen[str]:
    """The C load generator's subscribers (it reads as fast as it can), subscribed once it
    says `ready`, counting for `seconds` after `go` and until 3 s of quiet."""
    return subprocess.Popen(
        [str(loadgen()), "--port", str(port), "--path", f"/?token={token()}",
         "--subs", str(SUBSCRIBERS), "--rate", "0", "--sync", "1", "--channel", channel,
         "--duration", str(seconds), "--drain", "3"],
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
