"""The fuzzer's corpus, replayed: every input it kept, through a real worker, checked again.

`./dev fuzz` grows fuzz/corpus/ with a coverage-guided run (atheris, with picows and
fastfan/_core instrumented); this replays what it found on every CI run, without the
instrumentation, so a change that breaks an input the fuzzer once explored fails here.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))

from target import ContractError, Target, check_replies  # noqa: E402

CORPUS = sorted((FUZZ / "corpus").iterdir())


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    target = Target()
    yield target
    target.close()


def test_the_corpus_holds_the_seeds_and_the_fuzzers_finds() -> None:
    assert sum(path.name.startswith("seed-") for path in CORPUS) >= 20
    assert len(CORPUS) > 100, "the coverage-guided run's corpus is missing"


def test_every_corpus_input_gets_the_contracts_answers(target: Target) -> None:
    findings = []
    for path in CORPUS:
        try:
            target.run(path.read_bytes())
        except ContractError as finding:
            findings.append(f"{path.name}: {finding}")
    assert not findings, "\n".join(findings)


def test_a_finding_is_reported() -> None:
    """The checks can fail: a reply stream that does not open with the welcome is caught."""
    with pytest.raises(ContractError, match="first frame is not the welcome"):
        check_replies(b"\x81\x05hello")
