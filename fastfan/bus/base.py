"""The Bus: what every bus does, whichever carries the messages (embedded or Redis).

A Hub hands a bus what its clients publish, and the bus brings every message published
anywhere back to the Hub of each worker with subscribers for its channel. The Hub sees
only this class; a bus sees only the narrow HubLink below. fastfan.bus.factory builds the
bus the configuration names; nothing else asks which bus it has.

Publishing answers a BusResult: REFUSED (the bus is down: the client gets 503), DONE
(handed on: a `published` reply may go at once), or PENDING (the bus calls
`ack.acknowledge(channel, request_id, ok[, position])` once it knows; only when an `ack`
is given, i.e. the client asked for an acknowledgement). `exclude` is the publisher of an
`"echo":false` message (or the subject of a join/leave event): the fan-out of that message
skips it, on this worker, wherever the message comes back from.

Subscribing: the Hub calls `subscribe(channel)` when a channel gains its first local
subscriber and `unsubscribe` when it loses its last. `subscribe` answers True when the bus
will call `hub.confirm(channel)` once every message published anywhere afterwards reaches
this worker: until then the clients' `subscribed` replies wait (the `subscribed` promise).

History: on a channel with history (Hub.keeps_history) a publish goes to
`publish_history` instead: the bus numbers the message (fastfan.history) with one
sequencer per channel, keeps it, and fans it out numbered; it answers REFUSED or PENDING,
and acknowledges with the message's position. `read_history(channel, since, limit,
answer)` calls `answer(HistoryAnswer)` (or `answer(None)`: the store did not answer) with
the kept messages after offset `since` (the last `limit` when `since` < 0); the answer
reaches this worker in the stream of the channel's messages, after every message up to
its position and before every later one, once the channel is subscribed here:
Hub.subscribe_history's seam relies on it.

Presence: `joined`/`left` tell the bus of a local subscriber of a presence channel (a bus
that keeps presence elsewhere writes it there); `gather_presence` answers every worker's
and node's subscribers of a channel, counted, and at most --presence-limit of them listed
(a Presence: each worker sends no more than that, whatever the channel's size); Hub.
gather_presence asks it at most once per channel at a time. `gather_channels` answers
every worker's channel counts, and `nodes()` describes every node: each with `local`,
this worker's own part, added in.

`command(payload, ack)` carries a server API command (fastfan.bus.commands) to every worker
of every node, this one included, each of which applies it to its own Hub; it answers as
`publish` does.

Transitions (webhooks): `watch_transitions(listener)`, called before `start`, has the bus
tell `listener` (a Transitions) of every change across the whole deployment, on exactly
one worker of it: a channel's first subscriber anywhere (`occupied`), its last one gone
anywhere (`vacated`), a user's first connection in a presence channel anywhere
(`member_added`), their last one gone (`member_removed`). The bus learns this worker's part
from the calls it already has (subscribe, unsubscribe, joined, left; fastfan.webhooks.occupancy
counts them), and decides with the others who speaks: the worker itself (LocalBus), the
lowest-numbered worker alive (MeshBus), an atomic script in Redis (the Redis buses). A
worker or node that dies: its part is withdrawn by the others, and what that empties is
told. Without a listener a bus does none of this.

`health()` is what /ready and /metrics say of the bus; `figures()` the bus's rows of
/metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .._core import BusResult, Outbox
from ..directory import Counts
from ..history import HistoryAnswer
from ..presence import Entries as Entries
from ..presence import Presence as Presence

REFUSED, DONE, PENDING = BusResult.REFUSED, BusResult.DONE, BusResult.PENDING

class Acknowledger(Protocol):
    """Who waits for a publish's (or command's) late answer: a Session, or the server API."""

    def acknowledge(self, channel: str, request_id: bytes, ok: bool,
                    position: bytes = b"", refusal: str | None = None) -> None: ...


class HubLink(Protocol):
    """What a bus may ask of its worker's Hub: deliver, confirm, the local presence and
    counts, and the commands' effects. (fastfan._core.Hub is one.)"""

    @property
    def channels(self) -> Mapping[str, Any]: ...  # channels with local subscribers
    @property
    def history_size(self) -> int: ...
    @property
    def history_max_bytes(self) -> int: ...
    @property
    def presence_channels(self) -> Any: ...  # auth.ChannelPatterns
    @property
    def namespace_table(self) -> Any: ...  # fastfan.namespaces.NamespaceTable
    @property
    def presence_limit(self) -> int: ...
    def fanout(self, channel: str, payload: bytes | bytearray | memoryview,
               exclude: Outbox | None = None) -> int: ...
    def fanout_or_shed(self, channel: str, payload: bytes | bytearray | memoryview,
                       exclude: Outbox | None = None) -> int: ...
    def confirm(self, channel: str) -> None: ...
    def presence_of(self, channel: str) -> Entries: ...
    def presence_part(self, channel: str, limit: int) -> Presence: ...
    def subscriber_counts(self) -> dict[str, int]: ...
    @property
    def overloaded(self) -> bool: ...  # behind its output: hold_input what it reads
    def hold_input(self, transport: Any) -> None: ...
    def disconnect_user(self, user: str) -> int: ...
    def unsubscribe_user(self, user: str, channel: str) -> int: ...


class Transitions(Protocol):
    """Who hears of the deployment's transitions (see the module's docstring)."""

    def occupied(self, channel: str) -> None: ...
    def vacated(self, channel: str) -> None: ...
    def member_added(self, channel: str, user: str) -> None: ...
    def member_removed(self, channel: str, user: str) -> None: ...


@dataclass(frozen=True)
class BusHealth:
    up: bool                    # publishes are taken (/ready)
    dropped: int = 0            # messages it could not pass on
    invalid: int = 0            # payloads from Redis that were not a JSON object in UTF-8
    down: tuple[str, ...] = ()  # what is down, as /ready's 503 says it: "redis down"


class Bus(ABC):
    """See the module's docstring."""

    # @app.on_message (fastfan.hooks): `tap(channel, payload)` for every message of the
    # channels `tap_messages` names, once per node; None (no call at all) without it
    message_tap: Callable[[str, bytes], None] | None = None

    def tap_messages(self, patterns: list[str], tap: Callable[[str, bytes], None]) -> None:
        """Call `tap(channel, payload)` once per node for every message published on a
        channel matching one of `patterns` (`*`: any run of characters; `tap` may see
        other channels too, and checks), whoever published it.

        The embedded buses: every message passes through the worker that published it
        (with history, the channel's owner, which numbers it) before any other: that
        worker taps it, on its own, and no pattern needs telling anyone."""
        self.message_tap = tap

    @abstractmethod
    def publish(self, channel: str, payload: bytes, ack: Acknowledger | None,
                request_id: bytes, exclude: Outbox | None = None) -> int: ...

    @abstractmethod
    def publish_history(self, channel: str, payload: bytes, ack: Acknowledger | None,
                        request_id: bytes, exclude: Outbox | None = None) -> int: ...

    @abstractmethod
    def read_history(self, channel: str, since: int, limit: int,
                     answer: Callable[[HistoryAnswer | None], None]) -> None: ...

    @abstractmethod
    def subscribe(self, channel: str) -> bool: ...

    @abstractmethod
    def unsubscribe(self, channel: str) -> None: ...

    @abstractmethod
    def command(self, payload: bytes, ack: Acknowledger | None) -> int: ...

    @abstractmethod
    def joined(self, channel: str, client_id: bytes, user: str, info: str,
               metadata: str = "") -> None:
        """A local subscriber of a presence channel (the Hub's arrays are presence enough
        for a bus that asks the other workers); again when its `metadata` (JSON text, ""
        for none) changes."""

    @abstractmethod
    def left(self, channel: str, client_id: bytes) -> None:
        """See joined."""

    @abstractmethod
    def gather_presence(self, channel: str, answer: Callable[[Presence | None], None]) -> None:
        ...

    @abstractmethod
    def gather_channels(self, pattern: str | None, limit: int, local: Counts,
                        answer: Callable[[Counts | None], None]) -> None: ...

    @abstractmethod
    async def nodes(self) -> list[dict[str, Any]]:
        """Every node's description (directory.Node.describe); ConnectionError when the
        nodes cannot be asked."""

    @abstractmethod
    def watch_transitions(self, listener: Transitions) -> None:
        """From now on (called before start), tell `listener` of the deployment's
        transitions, each on exactly one worker (see the module's docstring)."""

    @abstractmethod
    def health(self) -> BusHealth: ...

    def figures(self) -> dict[str, float]:
        """The bus's rows of /metrics (fastfan.metrics.METRICS)."""
        return {"dropped_bus_total": float(self.health().dropped)}

    @abstractmethod
    async def start(self) -> None:
        """Connect; the bus may be down for a while after (health().up)."""

    @abstractmethod
    async def stop(self) -> None:
        """Disconnect."""
