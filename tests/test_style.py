"""The code stays as STYLE.md asks: ruff and mypy clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # mypy --strict over the package

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def test_ruff() -> None:
    result = run("ruff", "check", "fastfan", "tests", "benchmarks", "fuzz")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    result = run("mypy", "fastfan")
    assert result.returncode == 0, result.stdout + result.stderr
