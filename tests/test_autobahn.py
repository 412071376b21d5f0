"""Autobahn's fuzzing cases (through kosoku) against --echo-path; the compression cases (12.*
and 13.*: 216 cases of 1000 messages each, many minutes here) by a sample of every
subcategory: each corpus and each offer and answer, small and large, whole and fragmented."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import token
from kosoku import FailureError, run_fuzzingclient

PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}
CLEAN_CLOSE = {"OK", "INFORMATIONAL"}


def run_cases(url: str, cases: list[str] | None = None,
              exclude: list[str] | None = None) -> list[Any]:
    async def run() -> list[Any]:
        try:
            return await run_fuzzingclient(url, cases=cases, exclude_cases=exclude,
                                           concurrency=4)
        except FailureError as failure:
            return failure.results

    return asyncio.run(asyncio.wait_for(run(), timeout=240))


def failures(results: list[Any]) -> list[str]:
    return [f"{r.case_id} {r.behavior.value}/{r.behavior_close.value}: {r.description[:80]}"
            for r in results
            if r.behavior.value not in PASSING or r.behavior_close.value not in CLEAN_CLOSE]


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


# 16 bytes, 1 KiB, 8 KiB fragmented in 256-byte frames
COMPRESSION_SAMPLE = [f"{section}.{category}.{size}"
                      for section, categories in (("12", 5), ("13", 7))
                      for category in range(1, categories + 1) for size in (1, 4, 11)]


def test_autobahn_compression_cases_pass(echo_url: str) -> None:
    results = run_cases(echo_url, cases=COMPRESSION_SAMPLE)
    assert len(results) == 3 * (5 + 7)
    assert failures(results) == []
