#!/usr/bin/env python
"""Coverage-guided fuzzing of a worker's input path with atheris (libFuzzer).

    ./dev fuzz [seconds]     # builds the instrumented venv, then runs this on fuzz/corpus

Native coverage comes from picows and fastfan/_core built by clang with
-fsanitize=fuzzer-no-link (./dev does that, in .venv-fuzz); Python coverage from atheris's
instrumentation of the fastfan package. New inputs that reach new code are written to the
corpus directory; a ContractError (see target.py) stops the run and saves the input as crash-*.
"""

from __future__ import annotations

import importlib
import os
import sys

import atheris

TARGET = None


def one_input(data: bytes) -> None:
    TARGET.run(data)


def main() -> None:
    global TARGET
    # The instrumented extensions call libFuzzer's coverage callbacks as they load; atheris
    # would load its libFuzzer only in Fuzz(). Load it now, its symbols global, and tell
    # atheris to use that one (it would take a visible libFuzzer for an external one).
    sys.setdlopenflags(os.RTLD_NOW | os.RTLD_GLOBAL)
    importlib.import_module("atheris.core_with_libfuzzer")
    atheris.Setup(sys.argv, one_input, internal_libfuzzer=True)
    with atheris.instrument_imports(include=["fastfan"]):
        from target import Target
    TARGET = Target()
    atheris.Fuzz()


if __name__ == "__main__":
    main()
