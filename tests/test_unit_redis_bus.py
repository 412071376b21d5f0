"""The Redis bus's small parts: its reconnect backoff, commands in RESP (the bus's own
encoder and the tests' one, read back by hiredis and answered by a real redis-server), and
what presence logs while its writes fail."""

from __future__ import annotations

import itertools
import logging
import socket
from collections.abc import Callable

import hiredis
import pytest
from support.redis import RedisServer
from support.wire import resp

from fastfan.bus.redis import _command, reconnect_delay
from fastfan.presence.redis import Outage

ENCODERS: dict[str, Callable[..., bytes]] = {"fastfan.bus.redis": _command, "tests": resp}
# Bulk strings are length-prefixed: CRLF, NUL, empty and non-ASCII bytes go through as they are.
AWKWARD = [b"SUBSCRIBE", b"fastfan:a\r\nb", b"", b"\x00\xff", "é".encode(), b"x" * 70000]


def test_the_backoff_grows_by_50_ms_per_attempt_up_to_2_s() -> None:
    delays = [reconnect_delay(attempt) for attempt in range(1, 61)]
    assert delays[:3] == pytest.approx([0.05, 0.10, 0.15])
    assert all(a < b for a, b in itertools.pairwise(delays[:40]))
    assert delays[39] == pytest.approx(2.0)
    assert set(delays[39:]) == {2.0}


def test_presence_logs_an_outage_at_its_start_once_a_period_and_at_its_end(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "fastfan.redis")
    refused = ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    failing = "presence: writes to Redis fail (Error 111 connecting to 127.0.0.1:6379. " \
              "Connection refused.): "
    quiet = Outage()  # a minute between counts: none within this test
    for changes in (1, 2, 3):
        quiet.failed(changes, refused)
    quiet.worked()
    quiet.worked()  # writes work already: nothing to say
    first, back = (record.getMessage() for record in caplog.records)
    assert first.startswith(failing + "1 changes not written;")
    assert back.startswith("presence: writes to Redis work again after 0 s; 6 changes were "
                           "not written meanwhile")
    caplog.clear()
    counting = Outage(period=0)  # each failure after the first comes a period later
    for changes in (1, 2, 3):
        counting.failed(changes, refused)
    assert [record.getMessage().split(" changes")[0] for record in caplog.records] == [
        failing + "1", failing.replace("fail", "still fail") + "2",
        failing.replace("fail", "still fail") + "3"]


@pytest.mark.parametrize("encode", list(ENCODERS.values()), ids=list(ENCODERS))
def test_a_command_is_an_array_of_bulk_strings(encode: Callable[..., bytes]) -> None:
    assert encode(b"PING") == b"*1\r\n$4\r\nPING\r\n"
    assert encode(b"GET", b"k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    reader = hiredis.Reader()
    reader.feed(encode(*AWKWARD) + encode(b"PING"))
    assert reader.gets() == AWKWARD
    assert reader.gets() == [b"PING"]
    assert reader.gets() is False  # nothing left over


@pytest.mark.parametrize("encode", list(ENCODERS.values()), ids=list(ENCODERS))
def test_redis_server_reads_the_command_as_sent(encode: Callable[..., bytes],
                                                redis_server: RedisServer) -> None:
    value = b"a\r\nb\x00" + "é".encode()
    reader = hiredis.Reader()
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as sock:
        sock.sendall(encode(b"SET", b"k", value) + encode(b"GET", b"k") + encode(b"ECHO", b""))
        replies: list[object] = []
        while len(replies) < 3:
            reader.feed(sock.recv(65536))
            while (reply := reader.gets()) is not False:
                replies.append(reply)
    assert replies == [b"OK", value, b""]
