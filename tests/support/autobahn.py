"""Autobahn's fuzzing cases (through kosoku) against a URL, and the ones that failed."""

from __future__ import annotations

import asyncio
from typing import Any

from kosoku import FailureError, run_fuzzingclient

PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}
CLEAN_CLOSE = {"OK", "INFORMATIONAL"}

# the compression cases (12.* and 13.*), by a sample: 16 bytes, 1 KiB, 8 KiB fragmented in
# 256-byte frames
COMPRESSION_SAMPLE = [f"{section}.{category}.{size}"
                      for section, categories in (("12", 5), ("13", 7))
                      for category in range(1, categories + 1) for size in (1, 4, 11)]


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
