"""fuzz/ and benchmarks/ put tests/ on their path and import `wire`: it lives in
support/wire.py, beside the tests' other tools."""

from support.wire import *  # noqa: F403
