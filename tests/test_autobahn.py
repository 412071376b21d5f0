"""Autobahn's fuzzing cases (through kosoku) against --echo-path; the compression cases (12.*
and 13.*: 216 cases of 1000 messages each, many minutes here) by a sample of every
subcategory: each corpus and each offer and answer, small and large, whole and fragmented."""

from __future__ import annotations

from typing import Any

import pytest
from support.autobahn import COMPRESSION_SAMPLE, failures, run_cases
from support.server import token

pytestmark = pytest.mark.slow  # hundreds of Autobahn cases, minutes


@pytest.fixture
def echo_url(start_server: Any) -> str:
    # Autobahn's 9.* cases send 16 MiB messages and read the echo back as fast as it comes.
    server = start_server("--echo-path", "/echo", "--max-message-size", str(17 << 20),
                          "--max-buffer", str(64 << 20), "--log-level", "warning")
    return server.url("/echo", token=token())


def test_autobahn_cases_pass(echo_url: str) -> None:
    results = run_cases(echo_url, exclude=["12.*", "13.*"])
    assert len(results) > 290
    assert failures(results) == []


def test_autobahn_compression_cases_pass(echo_url: str) -> None:
    results = run_cases(echo_url, cases=COMPRESSION_SAMPLE)
    assert len(results) == 3 * (5 + 7)
    assert failures(results) == []
