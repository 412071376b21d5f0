"""The benchmark suite's quick variant: every server, a load all of them sustain.

It fails only when a server crashes or loses messages, never on speed (these machines
are shared and noisy): the figures are the suite's business, not the tests'.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_quick_suite_runs_every_server_without_loss() -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "--quick"],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for server in ("yardstick", "fastfan", "uws", "seed", "websockets", "socketio"):
        assert f"\n{server:>10} " in result.stdout
    assert "6 runs, 0 with a crash or loss" in result.stdout
