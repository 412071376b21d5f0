"""Ask every worker (or node), gather the answers with a deadline.

Presence and the API's `channels` ask the other workers over the embedded bus, or every
live worker of every node through Redis (the directory): each asked peer answers with its
part, and the asker answers its caller once every peer it reached has answered, with its
own part and theirs, or with None at the deadline (one may have just stopped: the caller
says 503, try again). A peer that goes away meanwhile owes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..directory import GATHER_TIMEOUT

Answer = Callable[[list[Any] | None], None]
T = TypeVar("T")


@dataclass
class _Gathering:
    answer: Answer
    waiting: set[Hashable]
    parts: list[Any] = field(default_factory=list)


class Gatherings:
    """The gatherings of one asker, by query number."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._open: dict[int, _Gathering] = {}
        self._next_query = 0

    def ask(self, local: list[Any], answer: Answer,
            ask_each: Callable[[int], Iterable[Hashable]]) -> None:
        """`ask_each(query)` sends the question numbered `query` and says whom it reached;
        `answer(local + every part)` once they have all answered, `answer(None)` at the
        deadline."""
        self._next_query += 1
        query = self._next_query
        self._open[query] = _Gathering(answer, set(ask_each(query)), list(local))
        asyncio.get_running_loop().call_later(self.timeout, self._give_up, query)
        self._finish_if_answered(query)

    def part(self, query: int, peer: Hashable, parts: list[Any]) -> None:
        """`peer`'s part of the answer to `query` (ignored if not asked or late)."""
        gathering = self._open.get(query)
        if gathering is not None and peer in gathering.waiting:
            gathering.waiting.discard(peer)
            gathering.parts += parts
            self._finish_if_answered(query)

    def gone(self, peer: Hashable) -> None:
        """`peer` went away: it owes no answer."""
        for query, gathering in list(self._open.items()):
            gathering.waiting.discard(peer)
            self._finish_if_answered(query)

    def _finish_if_answered(self, query: int) -> None:
        gathering = self._open[query]
        if not gathering.waiting:
            del self._open[query]
            gathering.answer(gathering.parts)

    def _give_up(self, query: int) -> None:
        gathering = self._open.pop(query, None)
        if gathering is not None:
            gathering.answer(None)


async def gathered(start: Callable[[Callable[[T | None], None]], None],
                   timeout: float = GATHER_TIMEOUT + 1) -> T | None:
    """What a callback-style gather (`start(answer)`) answers, awaited; None if it does not
    answer within `timeout` (its own deadline should come first)."""
    result: asyncio.Future[T | None] = asyncio.get_running_loop().create_future()

    def answer(value: T | None) -> None:
        if not result.done():
            result.set_result(value)

    start(answer)
    try:
        return await asyncio.wait_for(result, timeout)
    except TimeoutError:
        return None
