"""History kept in this worker's memory: the one-worker bus's and each mesh owner's
sequencer step, and the sweep of expired histories."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..bus.base import PENDING, Acknowledger
from . import HistoryFullError, HistoryStore, position

# How often a store forgets what has expired.
SWEEP_INTERVAL = 10.0


def sequence_here(history: HistoryStore, channel: str, payload: bytes,
                  ack: Acknowledger | None, request_id: bytes,
                  fanout: Callable[[bytes], object]) -> int:
    """A publish on a channel whose history this worker keeps: numbered, kept, handed to
    `fanout`, and acknowledged (if asked) with its position; or refused when the store is
    full (HistoryFullError). PENDING: the acknowledgement is made."""
    try:
        offset, epoch, numbered = history.sequence(channel, payload)
    except HistoryFullError as full:
        if ack is not None:
            ack.acknowledge(channel, request_id, False, refusal=str(full))
        return PENDING
    fanout(numbered)
    if ack is not None:
        ack.acknowledge(channel, request_id, True, position(offset, epoch))
    return PENDING


async def sweep_forever(history: HistoryStore) -> None:
    while True:
        await asyncio.sleep(SWEEP_INTERVAL)
        history.sweep()
