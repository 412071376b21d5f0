"""The embedded bus of several workers: every worker connected to every other one.

Each worker listens on a Unix socket in the abstract namespace, `\\0fastfan-<master pid>-
<slot>`, and connects out to every other slot. It sends on its outgoing connections (its
publishes, and which channels it has subscribers for) and receives on the incoming ones.
A publish is fanned out locally at once and sent, as the encoded `message`, only to the
workers that said they have subscribers for its channel: a worker subscribed to nothing
receives nothing. One stream per pair of workers keeps each publisher's order.

Cost per message: one record (6 bytes + channel + payload) appended to the outgoing buffer
of each interested worker, written once per loop turn, and a parse plus `Hub.fanout` on
the receiving side. A restarted worker binds the same name, the others reconnect to it
(and it to them) and tell it their channels again; what was published to it meanwhile is
lost for its clients, who were disconnected anyway.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

from .._core import Hub
from . import DONE

log = logging.getLogger("fastfan.bus")

HELLO, PUBLISH, SUBSCRIBE, UNSUBSCRIBE = 1, 2, 3, 4
# length of what follows the length field, record kind, channel length
HEADER = struct.Struct("!IBB")
# A worker that stops reading its bus connection (stuck or dying) must not grow our
# memory without bound: past this many unsent bytes, messages for it are dropped.
MAX_PEER_BACKLOG = 64 << 20
RECONNECT_DELAY_MAX = 1.0


def address(namespace: str, slot: int) -> str:
    return f"\0fastfan-{namespace}-{slot}"


def record(kind: int, channel: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(2 + len(channel) + len(payload), kind, len(channel)) + channel + payload


class Incoming(asyncio.Protocol):
    """A connection from another worker: its HELLO, its channels, its publishes."""

    def __init__(self, bus: MeshBus) -> None:
        self.bus = bus
        self.slot: int | None = None
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset, end = 0, len(buffer)
        fanout = self.bus.hub.fanout
        while end - offset >= 4:
            size = int.from_bytes(buffer[offset:offset + 4], "big")
            if end - offset - 4 < size:
                break
            kind, channel_length = buffer[offset + 4], buffer[offset + 5]
            start = offset + 6
            channel = buffer[start:start + channel_length].decode("ascii")
            offset += 4 + size
            if kind == PUBLISH:
                fanout(channel, buffer[start + channel_length:offset])
            elif kind == SUBSCRIBE:
                self.bus.interest_of(self.slot).add(channel)
            elif kind == UNSUBSCRIBE:
                self.bus.interest_of(self.slot).discard(channel)
            elif kind == HELLO:
                self.slot = int(channel)
                self.bus.interest_of(self.slot).clear()
        del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slot is not None:
            self.bus.interest_of(self.slot).clear()


class Outgoing(asyncio.Protocol):
    """Our connection to another worker; records queue up and go out once per loop turn."""

    def __init__(self, bus: MeshBus, slot: int) -> None:
        self.bus = bus
        self.slot = slot
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport
        self.pending = bytearray()
        self.flush_scheduled = False
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send(self, data: bytes) -> bool:
        transport = self.transport
        if transport is None or transport.get_write_buffer_size() > MAX_PEER_BACKLOG:
            return False
        self.pending += data
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        return True

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.transport is not None and self.pending:
            self.transport.write(bytes(self.pending))
        self.pending.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)


class MeshBus:
    up = True

    def __init__(self, hub: Hub, slot: int, workers: int, namespace: str) -> None:
        self.hub = hub
        self.slot = slot
        self.workers = workers
        self.namespace = namespace
        self.outgoing: dict[int, Outgoing] = {}
        self.interest: dict[int, set[str]] = {s: set() for s in range(workers) if s != slot}
        self.dropped_total = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def interest_of(self, slot: int | None) -> set[str]:
        return self.interest.get(slot, set()) if slot is not None else set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address(self.namespace, self.slot))
        listener.listen(self.workers * 2)
        self._server = await loop.create_unix_server(lambda: Incoming(self), sock=listener)
        self._tasks = [loop.create_task(self._stay_connected(s)) for s in self.interest]

    async def _stay_connected(self, slot: int) -> None:
        """Connect to a worker, tell it who we are and our channels; reconnect if it goes."""
        loop = asyncio.get_running_loop()
        delay = 0.01
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address(self.namespace, slot))
            except OSError:
                sock.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_DELAY_MAX)
                continue
            delay = 0.01
            _, peer = await loop.create_unix_connection(lambda: Outgoing(self, slot), sock=sock)
            peer.send(record(HELLO, str(self.slot).encode())
                      + b"".join(record(SUBSCRIBE, c.encode()) for c in self.hub.channels))
            self.outgoing[slot] = peer
            await peer.lost
            del self.outgoing[slot]

    def publish(self, channel: str, payload: bytes, session: Any, request_id: bytes) -> int:
        self.hub.fanout(channel, payload)
        data = None
        for slot, peer in self.outgoing.items():
            if channel in self.interest[slot]:
                if data is None:
                    data = record(PUBLISH, channel.encode(), payload)
                if not peer.send(data):
                    self.dropped_total += 1
        return DONE

    def _tell_peers(self, kind: int, channel: str) -> None:
        data = record(kind, channel.encode())
        for peer in self.outgoing.values():
            peer.send(data)

    def subscribe(self, channel: str) -> None:
        self._tell_peers(SUBSCRIBE, channel)

    def unsubscribe(self, channel: str) -> None:
        self._tell_peers(UNSUBSCRIBE, channel)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()
