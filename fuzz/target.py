"""One fuzz input, end to end: the bytes a client sends after its upgrade, into a real worker.

A worker (Hub, listener factory, picows on uvloop, the embedded bus) runs in this process on
a loopback port. Each input is sent on a fresh connection right after a valid upgrade, then
the client half-closes. The input reaches picows's frame parser, the RFC 6455 checks, the
UTF-8 validator, fragment reassembly and the message decoder; what comes back is checked
against the contract, and once the connection is gone the worker must hold nothing of it.

A failed check raises `ContractError`: the fuzzer saves the input, the corpus replay test fails.
Inputs are most readable with the all-zero masking key (payload bytes as they are).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import sys
from pathlib import Path

import uvloop

from fastfan.config import Config
from fastfan.master import listen
from fastfan.metrics import SharedFigures
from fastfan.worker import Placement, Worker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from wire import CLOSE, PING, PONG, TEXT, free_port, parse_frame

UPGRADE = (b"GET / HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
# A CLOSE's code is the contract's own (1001, 1002, 1003, 1007, 1009, 4001, 4008, 4029) or
# the client's, echoed: any code RFC 6455 (7.4) and the IANA registry let travel on the wire.
CLOSE_CODES = {1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)}
REPLY_TYPES = {"welcome", "subscribed", "unsubscribed", "published", "pong", "message", "error",
               "stats", "presence", "presence_stats", "refreshed", "join", "leave",
               "history"}
ERROR_CODES = {400, 401, 403, 409, 429, 503}  # 500 is "internal": a bug, not an answer
REPLY_TIMEOUT = 3.0


class ContractError(AssertionError):
    """The server did something the contract does not allow."""


class ErrorRecords(logging.Handler):
    """Every ERROR the server logs while an input runs: an exception that reached picows."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Target:
    """A worker on its own uvloop loop; `run(data)` sends one input and checks the outcome."""

    def __init__(self) -> None:
        # Small limits, so that short inputs reach the paths behind them: the message size
        # limit, the publish rate's 429 and 4029, the subscription limit.
        self.config = Config(host="127.0.0.1", port=free_port(), insecure=True,
                             max_message_size=4096, max_subscriptions=8, publish_rate=5,
                             stats_interval=3600, log_level="error",
                             history_size=4, history_channels="h*")  # history on some
        self.loop = uvloop.new_event_loop()
        self.errors = ErrorRecords()
        logging.getLogger().addHandler(self.errors)
        logging.getLogger("fastfan").setLevel(logging.ERROR)
        self.loop.set_exception_handler(self._loop_exception)
        self.worker: Worker = self.loop.run_until_complete(self._start())

    async def _start(self) -> Worker:
        (sockets,) = listen(self.config.host, self.config.port, 1, ("--host", "--port"))
        worker = Worker(self.config, Placement(0, os.getppid(), SharedFigures(1)), sockets, [])
        self._serving = self.loop.create_task(worker.serve())
        while not worker.accepting:
            await asyncio.sleep(0.01)
        return worker

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        self.errors.records.append(logging.makeLogRecord({"msg": str(context)}))

    def run(self, data: bytes) -> None:
        self.errors.records.clear()
        output, reset = self.loop.run_until_complete(self._exchange(data))
        check_replies(output, whole=not reset)
        self.loop.run_until_complete(self._settled())
        if self.errors.records:
            raise ContractError("the server logged: " + self.errors.records[0].getMessage())

    def close(self) -> None:
        self.worker._stop.set()
        self.loop.run_until_complete(self._serving)
        logging.getLogger().removeHandler(self.errors)
        self.loop.close()

    async def _exchange(self, data: bytes) -> tuple[bytes, bool]:
        """Upgrade, send `data`, half-close; what the server sent, and whether it ended
        with a reset (the server closed with our bytes unread: whatever followed them in
        flight is lost, so only the whole frames received can be checked)."""
        client = Client(self.loop)
        transport, _ = await self.loop.create_connection(
            lambda: client, self.config.host, self.config.port)
        try:
            transport.write(UPGRADE)
            await asyncio.wait_for(client.upgraded.wait(), REPLY_TIMEOUT)
            transport.write(data)
            transport.write_eof()
            try:
                await asyncio.wait_for(client.closed, REPLY_TIMEOUT)
            except TimeoutError:
                raise ContractError(
                    f"no close within {REPLY_TIMEOUT} s of the client's EOF") from None
            return client.frames(), client.reset
        finally:
            transport.close()

    async def _settled(self) -> None:
        """The connection is gone from the worker, with every subscription it made."""
        held: dict[str, int] = {}
        for _ in range(200):
            stats = self.worker.hub.stats()
            held = {name: stats[name] for name in ("connections", "subscriptions", "channels")}
            if not any(held.values()):
                return
            await asyncio.sleep(0.005)
        raise ContractError(f"left behind once the client was gone: {held}")


class Client(asyncio.Protocol):
    """The fuzzing client's end: everything the server sends, kept through a reset."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.received = bytearray()
        self.upgraded = asyncio.Event()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.reset = False

    def data_received(self, data: bytes) -> None:
        self.received += data
        if not self.upgraded.is_set() and b"\r\n\r\n" in self.received:
            head, _, rest = bytes(self.received).partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                self.closed.set_exception(ContractError(f"the upgrade was refused: {head[:40]!r}"))
            self.received = bytearray(rest)
            self.upgraded.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.reset = exc is not None
        if not self.closed.done():
            self.closed.set_result(None)

    def frames(self) -> bytes:
        if not self.upgraded.is_set():
            raise ContractError("the connection closed during the upgrade")
        return bytes(self.received)


def server_frames(output: bytes, whole: bool = True) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each frame the server sent; raises on a malformed one.

    With whole=False (the stream was cut by a reset) a truncated last frame is dropped.
    """
    frames = []
    at = 0
    while at < len(output):
        if len(output) - at >= 2:  # its first two bytes judge a frame, even one cut short
            if output[at + 1] & 0x80:
                raise ContractError("the server masked a frame")
            if output[at] & 0x70:
                raise ContractError("the server set RSV bits")
        got = parse_frame(output, at)
        if got is None:
            if not whole:
                break
            raise ContractError(f"a truncated frame at byte {at}")
        frames.append((got.opcode, got.payload))
        at += got.size
    return frames


def check_replies(output: bytes, whole: bool = True) -> None:
    """Each reply is one the contract has; nothing follows a CLOSE."""
    frames = server_frames(output, whole)
    if not frames and not whole:
        return  # reset before the welcome was read
    if not frames or frames[0][0] != TEXT or b'"welcome"' not in frames[0][1]:
        raise ContractError("the first frame is not the welcome")
    for number, (opcode, payload) in enumerate(frames):
        if opcode == TEXT:
            check_text_reply(payload)
        elif opcode == CLOSE:
            if number != len(frames) - 1:
                raise ContractError("frames after the server's CLOSE")
            if payload:
                (code,) = struct.unpack_from("!H", payload)
                if code not in CLOSE_CODES:
                    raise ContractError(f"closed with {code}: {payload[2:]!r}")
                payload[2:].decode("utf-8")  # the reason is valid UTF-8
        elif opcode not in (PING, PONG):
            raise ContractError(f"the server sent opcode {opcode}")


def check_text_reply(payload: bytes) -> None:
    try:
        reply = json.loads(payload)
    except ValueError as exc:
        raise ContractError(f"a reply that is not JSON: {payload[:80]!r}") from exc
    if not isinstance(reply, dict) or reply.get("type") not in REPLY_TYPES:
        raise ContractError(f"a reply the contract does not have: {payload[:80]!r}")
    if reply["type"] == "error" and reply.get("code") not in ERROR_CODES:
        raise ContractError(f"error {reply.get('code')}: {reply.get('message')}")
