"""The tests' hand-made frames against an independent reading of RFC 6455, the `websockets`
library's: what wire.frame builds, it parses; what it serializes, wire.parse_frame reads."""

from __future__ import annotations

import os

import pytest
from support.wire import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    ZERO_KEY,
    frame,
    frame_head,
    parse_frame,
)
from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.frames import Frame as WebsocketsFrame
from websockets.frames import Opcode
from websockets.streams import StreamReader

# Payload sizes either side of each length encoding: 7 bits, 16 bits, 64 bits.
SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]
DATA_OPCODES = [TEXT, BINARY, CONTINUATION]


def parsed_by_websockets(data: bytes, *, mask: bool) -> WebsocketsFrame:
    """One frame as `websockets` reads it (as a server when `mask`); every byte used."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = WebsocketsFrame.parse(reader.read_exact, mask=mask)
    try:
        next(parser)
    except StopIteration as done:
        assert not reader.buffer, f"{len(reader.buffer)} bytes after the frame"
        return done.value  # type: ignore[no-any-return]
    raise AssertionError("websockets wants more bytes than the frame has")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("opcode", DATA_OPCODES)
@pytest.mark.parametrize("fin", [True, False])
def test_a_data_frame_is_what_websockets_reads(size: int, opcode: int, fin: bool) -> None:
    payload = os.urandom(size)
    for key in (None, ZERO_KEY):  # a random key, and the fuzz seeds' one
        built = frame(opcode, payload, fin=fin, key=key)
        read = parsed_by_websockets(built, mask=True)
        assert (read.opcode, read.data, read.fin) == (Opcode(opcode), payload, fin)


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_a_control_frame_is_what_websockets_reads(opcode: int) -> None:
    payload = b"\x03\xe8bye" if opcode == CLOSE else os.urandom(125)
    read = parsed_by_websockets(frame(opcode, payload), mask=True)
    assert (read.opcode, read.data, read.fin) == (Opcode(opcode), payload, True)


def test_a_random_key_masks_and_the_zero_key_leaves_the_payload_readable() -> None:
    payload = b'{"type":"ping"}' * 4
    readable = bytes([0x81, 0x80 | len(payload)]) + bytes(4) + payload
    assert frame(TEXT, payload, key=ZERO_KEY) == readable
    assert payload not in frame(TEXT, payload)
    assert frame(TEXT, payload) != frame(TEXT, payload)  # a fresh key each time


def test_the_frames_a_client_must_not_send_are_refused_by_websockets_too() -> None:
    """What tests build to break the rules breaks them where websockets looks as well."""
    unmasked = frame(TEXT, b"{}", masked=False)
    assert parsed_by_websockets(unmasked, mask=False).data == b"{}"
    with pytest.raises(ProtocolError, match="mask"):
        parsed_by_websockets(unmasked, mask=True)
    for rsv in range(1, 8):
        with pytest.raises(ProtocolError, match="reserved bits"):
            parsed_by_websockets(frame(TEXT, b"{}", rsv=rsv), mask=True)
        assert parse_frame(frame(TEXT, b"{}", rsv=rsv)).rsv == rsv  # type: ignore[union-attr]
    with pytest.raises(ProtocolError):
        parsed_by_websockets(frame(PING, b"p" * 126), mask=True)  # control frame too long
    with pytest.raises(ProtocolError):
        parsed_by_websockets(frame(PING, b"p", fin=False), mask=True)  # fragmented control


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("masked", [False, True])
def test_parse_frame_reads_what_websockets_serializes(size: int, masked: bool) -> None:
    payload = os.urandom(size)
    first = WebsocketsFrame(Opcode.BINARY, payload, fin=False).serialize(mask=masked)
    second = WebsocketsFrame(Opcode.PONG, b"pong").serialize(mask=masked)
    stream = first + second
    one = parse_frame(stream)
    assert one is not None
    assert (one.fin, one.rsv, one.opcode, one.masked, one.payload, one.size) == (
        False, 0, BINARY, masked, payload, len(first))
    two = parse_frame(stream, one.size)
    assert two is not None
    assert (two.fin, two.opcode, two.payload, one.size + two.size) == (
        True, PONG, b"pong", len(stream))


@pytest.mark.parametrize("size", [0, 125, 126, 65536])
def test_parse_frame_waits_for_every_byte_of_a_frame(size: int) -> None:
    whole = frame(BINARY, os.urandom(size))
    cuts = {*range(min(len(whole), 20)), len(whole) - 1}
    assert [cut for cut in sorted(cuts) if parse_frame(whole[:cut]) is not None] == []
    assert parse_frame(whole) is not None


@pytest.mark.parametrize("size", [1 << 16, 1 << 30, 1 << 40])
def test_a_frame_head_alone_announces_its_whole_length(size: int) -> None:
    head = frame_head(TEXT, size) + ZERO_KEY
    assert parse_frame(head + b"x" * 100) is None  # the rest never comes
    reader = StreamReader()
    reader.feed_data(head)
    with pytest.raises(PayloadTooBig, match=str(size)):
        next(WebsocketsFrame.parse(reader.read_exact, mask=True, max_size=size - 1))
