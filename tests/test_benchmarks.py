"""The benchmark suite's quick variant: every server, a load all of them sustain.

It fails only when a server crashes or loses messages, never on speed (these machines
are shared and noisy): the figures are the suite's business, not the tests'.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark suite's own checks

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_quick_suite_runs_every_server_without_loss() -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "--quick"],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for server in ("yardstick", "fastfan", "uws", "seed", "websockets", "socketio"):
        assert f"\n{server:>10} " in result.stdout
    assert "6 runs, 0 with a crash or loss" in result.stdout


def test_fanout_pusher_runs_pusher_and_fastfan_subscribers_without_loss(
        tmp_path: Path) -> None:
    """The fanout-pusher scenario at one light rate: fastfan's own subscribers with a
    WebSocket publisher, then fastfan's and Pusher's subscribers of a Pusher channel
    published to through the server API; each gets every message."""
    sys.path.insert(0, str(BENCHMARKS))
    import run

    scenario = replace(run.SCENARIOS["fanout"], name="fanout-pusher", rates=(20e3,))
    rows = run.run_scenario(scenario, list(run.FANOUT_PUSHER), 1.0, tmp_path)
    assert [row["server"] for row in rows] == ["fastfan", "fastfan-api", "fastfan-pusher"]
    for row in rows:
        assert not row["crashed"] and row["lost"] == 0 and row["reordered"] == 0
        assert row["delivered"] == row["expected"] == 1000 * row["sent"] > 0
    assert [row["api_answered"] for row in rows] == [0, rows[1]["sent"], rows[2]["sent"]]


def test_history_study_reconnect_storm_recovers() -> None:
    """The history study's storm at a small scale: 200 clients from 2 processes each get
    `recovered:true` and the 100 messages they missed; its publisher counts its acks."""
    sys.path.insert(0, str(BENCHMARKS))
    from lib import free_port, start_fastfan
    from studies import history
    from studies.common import NO_HEARTBEAT, stop

    port = free_port()
    server = start_fastfan(port, [*history.HISTORY_ON, *NO_HEARTBEAT], pin=False)
    try:
        acked, _ = history._publish_acked(port, ["storm.t"], count=150)
        assert acked == 150
        top, epoch = history._position(port, "storm.t")
        assert top == 150
        row = history._storm(port, [server.pid], "storm.t", {"offset": top - 100, "epoch": epoch},
                             100, clients=200, processes=2)
    finally:
        stop(server)
    assert row["clients"] == 200 and row["not_recovered"] == 0
