"""The README's examples, run as a user would run them, say what a user will see."""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path
from typing import Any

from support.server import Server, token

README = Path(__file__).resolve().parent.parent / "README.md"


def python_example(after: str) -> str:
    """The first ```python block of the README after the line containing `after`."""
    text = README.read_text()
    match = re.search(re.escape(after) + r".*?```python\n(.*?)```", text, re.DOTALL)
    assert match is not None, f"no python example after {after!r} in README.md"
    return match.group(1)


def test_the_websockets_example_shows_what_a_user_sees_with_several_workers(
        start_server: Any) -> None:
    server: Server = start_server("--workers", "2")
    code = python_example("Or with any WebSocket library").replace(
        "ws://localhost:8080/", server.url())
    for _ in range(4):  # each run may land on either worker
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(code, {"token": token()})  # the README's own example
        types = [ast.literal_eval(line)["type"] for line in printed.getvalue().splitlines()]
        assert types[:2] == ["welcome", "subscribed"]
        assert sorted(types[2:]) == ["message", "published"]
