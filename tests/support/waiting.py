"""Waiting on a condition, never for a fixed time; and reading until a client falls quiet."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from support.wire import RawClient

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """The predicate's first truthy value, asked every `interval` until `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")


def collect(client: RawClient, quiet: float = 1.0) -> list[dict[str, Any]]:
    """Every message that arrives until none has for `quiet` seconds."""
    received = []
    client.sock.settimeout(quiet)
    try:
        while True:
            received.append(client.recv_json())
    except TimeoutError:
        return received
    finally:
        client.sock.settimeout(5)


def assert_received_by_all(listeners: list[RawClient], acknowledged: set[int]) -> None:
    """Every listener receives every acknowledged publish (their `data`: numbers)."""
    for listener in listeners:
        received: set[int] = set()
        while not acknowledged <= received:
            try:
                received.add(listener.recv_json()["data"])
            except TimeoutError:
                break
        assert acknowledged - received == set()
