"""Type stubs of the compiled fastfan/bus/_resp.pyx."""

from collections import deque
from collections.abc import Callable
from typing import Any

from .._core import Outbox

def publish_cost(channel: bytes, payload: bytes, request_id: bytes) -> int: ...
def answer_replies(reader: Any, waiting: deque[Any], answer: Callable[[Any, Any], None],
                   publishes: Publishes | None) -> bool: ...

class Publishes:
    prefix: bytes
    verb: bytes
    up: bool
    full: bool
    scheduled: bool
    queued_bytes: int
    max_bytes: int
    def __init__(self, hub: Any, prefix: bytes, verb: bytes, max_bytes: int,
                 unechoed: dict[bytes, Outbox], history: Any, schedule: Callable[[], None],
                 overflowed: Callable[[], None], room: Callable[[], None]) -> None: ...
    def publish(self, channel: str, payload: bytes, ack: Any, request_id: bytes,
                exclude: Outbox | None, history: bool) -> int: ...
    def take(self) -> tuple[bytes, list[Any]]: ...
    def waiting(self) -> bool: ...
    def answered(self, cost: int) -> None: ...

class Pushes:
    directory_channels: set[bytes] | None
    divert: Callable[[bytes, bytes], None] | None
    invalid_total: int
    def __init__(self, hub: Any, prefix: bytes, commands: bytes, reply_suffix: bytes,
                 special: Callable[[bytes, bytes], None], unechoed: dict[bytes, Outbox],
                 unechoed_publisher: Callable[[bytes], Outbox | None],
                 is_json_object: Callable[[bytes], Any]) -> None: ...
    def well_formed(self, payload: bytes) -> bool: ...
    def message(self, channel: bytes, payload: bytes) -> None: ...
    def deliver(self, channel: bytes, payload: bytes) -> None: ...
    def take(self, reader: Any, other: Callable[[Any], None]) -> None: ...
