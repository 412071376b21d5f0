"""What the server API's `channels` and `info`, and the status page, say about the whole
deployment: a worker's channel counts, a node's description, and how answers add up.

A worker's part of a `channels` answer is a list of [channel, subscribers] pairs; the
buses gather every worker's part (the embedded bus over its sockets, Redis through a
query channel, fastfan.directory.redis) and `add_up` sums them per channel, as one
channel may have subscribers on several workers.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import status
from ..auth import ChannelPatterns

# The most channels one worker lists in its part of an answer: bounds an answer (each
# entry at most a 255-byte name and a count) to about 54 MB even on a worker holding
# millions of channels. Past it, the worker lists its busiest ones.
MAX_LISTED = 200_000
# How long a gather waits for every worker's (and node's) part before answering 503.
GATHER_TIMEOUT = 2.0

Counts = list[tuple[str, int]]


def channel_counts(subscribers: Mapping[str, int], pattern: str | None,
                   limit: int = MAX_LISTED) -> Counts:
    """Of this worker's channels and their subscribers (Hub.subscriber_counts), those that
    match `pattern` (`*` for any run of characters; none: every channel); its `limit`
    busiest when it has more."""
    matches = ChannelPatterns([pattern or "*"]).allows
    counts = {name: count for name, count in subscribers.items() if count and matches(name)}
    if len(counts) > limit:
        return status.busiest(counts, limit)
    return list(counts.items())


def add_up(parts: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Every worker's [channel, subscribers] pairs, summed per channel."""
    total: dict[str, int] = {}
    for name, count in parts:
        total[name] = total.get(name, 0) + count
    return total


def process_start_time(pid: int) -> float:
    """When process `pid` started, in epoch seconds (from /proc; now if it cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            booted = time.time() - float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return booted + ticks / os.sysconf("SC_CLK_TCK")


def node_name(port: int) -> str:
    """A node's name in `info`: this machine's hostname and the WebSocket port, so that
    two nodes on one machine are told apart."""
    return f"{socket.gethostname()}:{port}"


@dataclass(frozen=True)
class Node:
    """This node as `info` describes it; every worker of the node describes it alike."""

    name: str
    workers: int
    started: float  # when the master started, in epoch seconds
    figures: Callable[[], Mapping[str, float]]  # the node's figures, every worker's added up

    def describe(self) -> dict[str, Any]:
        figures = self.figures()
        return {"name": self.name, "workers": self.workers,
                "connections": int(figures.get("connections", 0)),
                "subscriptions": int(figures.get("subscriptions", 0)),
                "uptime": int(time.time() - self.started)}
