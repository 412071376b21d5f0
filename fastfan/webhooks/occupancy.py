"""Who holds what, for the deployment's transitions (Bus.watch_transitions, webhooks).

A *holding* is a channel (`user` None: the worker has subscribers of it) or a member of a
presence channel (`user`: the worker has connections of that user subscribed to it).
LocalOccupancy turns the calls a bus already has (subscribe and unsubscribe: a channel's
first and last local subscriber; joined and left: a subscriber of a presence channel) into
this worker's *edges*: a holding it starts or stops. Whether an edge is a transition of the
whole deployment (nobody else holds it) is for the bus to decide: Holders is that decision
made from every worker's edges (the embedded bus replicates them to every worker), and
webhooks/redis.py makes it in Redis. `tell` hands a transition to the listener.
"""

from __future__ import annotations

from collections.abc import Callable

from .._core import WATCH_PREFIX
from ..bus.base import Transitions

# (channel, user or None for the channel itself)
Holding = tuple[str, str | None]
# (channel, user or None, on): this worker starts (on) or stops holding it
Edge = Callable[[str, str | None, bool], None]


def tell(listener: Transitions, channel: str, user: str | None, on: bool) -> None:
    """A transition of a holding, as the listener's event."""
    if user is None:
        (listener.occupied if on else listener.vacated)(channel)
    else:
        (listener.member_added if on else listener.member_removed)(channel, user)


class Listeners:
    """Several listeners of the transitions (webhooks and Pusher's member events), as one."""

    def __init__(self, listeners: list[Transitions]) -> None:
        self.listeners = listeners

    def occupied(self, channel: str) -> None:
        for listener in self.listeners:
            listener.occupied(channel)

    def vacated(self, channel: str) -> None:
        for listener in self.listeners:
            listener.vacated(channel)

    def member_added(self, channel: str, user: str) -> None:
        for listener in self.listeners:
            listener.member_added(channel, user)

    def member_removed(self, channel: str, user: str) -> None:
        for listener in self.listeners:
            listener.member_removed(channel, user)


class LocalOccupancy:
    """This worker's holdings, from its bus's calls; `edge` hears each start and stop."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.channels: set[str] = set()
        self.members: dict[tuple[str, str], int] = {}  # (channel, user) -> connections here
        self.users: dict[tuple[str, bytes], str] = {}  # (channel, clientId) -> its user

    def subscribed(self, channel: str) -> None:
        if not channel.startswith(WATCH_PREFIX):  # a watcher's channel is not a channel
            self.channels.add(channel)
            self.edge(channel, None, True)

    def unsubscribed(self, channel: str) -> None:
        if channel in self.channels:
            self.channels.discard(channel)
            self.edge(channel, None, False)

    def joined(self, channel: str, client_id: bytes, user: str) -> None:
        self.users[channel, client_id] = user
        count = self.members.get((channel, user), 0)
        self.members[channel, user] = count + 1
        if not count:
            self.edge(channel, user, True)

    def left(self, channel: str, client_id: bytes) -> None:
        user = self.users.pop((channel, client_id), None)
        if user is None:
            return
        count = self.members.pop((channel, user)) - 1
        if count:
            self.members[channel, user] = count
        else:
            self.edge(channel, user, False)

    def holdings(self) -> list[Holding]:
        """Everything held here, channels first."""
        return [*((channel, None) for channel in self.channels), *self.members]


class Holders:
    """Every worker's holdings, as their edges arrive (in order from each worker): an edge
    that makes a holding held by someone, or by nobody, is a transition."""

    def __init__(self) -> None:
        self.holders: dict[Holding, set[int]] = {}
        self.held: dict[int, set[Holding]] = {}

    def apply(self, worker: int, channel: str, user: str | None, on: bool) -> bool:
        """Whether worker `worker`'s edge is a transition."""
        holding = (channel, user)
        holders = self.holders.get(holding)
        if on:
            if holders is None:
                holders = self.holders[holding] = set()
            fresh = not holders
            holders.add(worker)
            self.held.setdefault(worker, set()).add(holding)
            return fresh
        if holders is None or worker not in holders:
            return False
        self.held[worker].discard(holding)
        return self._release(worker, holding)

    def withdraw(self, worker: int) -> list[Holding]:
        """Worker `worker` is gone: what nobody holds any more, members before channels."""
        emptied = [holding for holding in self.held.pop(worker, set())
                   if self._release(worker, holding)]
        return sorted(emptied, key=lambda holding: holding[1] is None)

    def _release(self, worker: int, holding: Holding) -> bool:
        holders = self.holders[holding]
        holders.discard(worker)
        if holders:
            return False
        del self.holders[holding]
        return True
