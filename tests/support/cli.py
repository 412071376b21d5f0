"""The command line as a test runs it: `python -m fastfan ...` without the FASTFAN_
variables of the environment it runs in, and what a usage error looks like."""

from __future__ import annotations

import os
import subprocess
import sys


def fastfan(*args: str, env: dict[str, str] | None = None,
            timeout: float = 10) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FASTFAN_")}
    return subprocess.run([sys.executable, "-m", "fastfan", *args], capture_output=True,
                          text=True, timeout=timeout, env={**clean, **(env or {})})


def assert_usage_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usage:")
    for word in words:
        assert word in result.stderr
