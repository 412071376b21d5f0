"""The client's CLOSE is its last frame: whatever shares its read is ignored.

Autobahn case 7.1.2 sends two CLOSE frames; when they reach the server in one read, picows
2.3.1 parsed the second before handing us the first and answered it with 1002 itself, so
the client never got its own code back. Here every follower is sent with the CLOSE in one
send() on loopback (one segment, one read): deterministic, where Autobahn's timing is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.patched import (
    FOLLOWERS,
    assert_one_close_with_the_clients_code_then_eof,
    assert_the_server_still_serves_after_all_that,
)
from support.server import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = Path(tmp_path_factory.mktemp("close")) / "server.log"
    server = Server(log, "--echo-path", "/echo")
    yield server
    server.stop()


@pytest.mark.parametrize("path", ["/", "/echo"])
@pytest.mark.parametrize("follower", FOLLOWERS.values(), ids=FOLLOWERS.keys())
def test_one_close_with_the_clients_code_then_eof(server: Server, path: str,
                                                  follower: bytes) -> None:
    assert_one_close_with_the_clients_code_then_eof(server, path, follower)


def test_the_server_still_serves_after_all_that(server: Server) -> None:
    assert_the_server_still_serves_after_all_that(server)
