"""RFC 6455 rules that picows leaves to us, and every close code of the contract."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from support.server import Server, token
from support.wire import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    HandshakeRefusedError,
    RawClient,
    frame,
    frame_head,
)


@pytest.fixture
def limited(start_server: Any) -> Server:
    """A server whose --max-message-size is 1000 bytes."""
    return start_server("--max-message-size", "1000")


def assert_closed_with(client: RawClient, code: int) -> None:
    assert client.recv_close()[0] == code
    client.close()


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4999])
def test_a_clients_close_is_answered_with_its_own_code(server: Server, code: int) -> None:
    client = server.connect()
    client.send_frame(CLOSE, struct.pack("!H", code) + b"bye")
    assert client.recv_close()[0] == code
    assert client.at_eof()


def test_an_empty_close_is_answered_with_1000(server: Server) -> None:
    client = server.connect()
    client.send_frame(CLOSE)
    assert client.recv_close()[0] == 1000


# Frame sequences that break RFC 6455 or the protocol: (frames as (opcode, payload, fin,
# rsv)), and the close code each must get.
BAD_SEQUENCES = {
    **{f"rsv {rsv}": ([(TEXT, b'{"type":"ping"}', True, rsv)], 1002) for rsv in (1, 2, 4, 7)},
    "rsv on a ping": ([(PING, b"x", True, 4)], 1002),
    "continuation without a message": ([(CONTINUATION, b"abc", True, 0)], 1002),
    "new message inside a fragmented one": (
        [(TEXT, b'{"type":', False, 0), (TEXT, b'"ping"}', True, 0)], 1002),
    **{f"reserved opcode {op:#x}": ([(op, b"", True, 0)], 1002) for op in (0x3, 0x7, 0xB, 0xF)},
    "fragmented control frame": ([(PING, b"a", False, 0)], 1002),
    "control frame over 125 bytes": ([(PING, b"a" * 126, True, 0)], 1002),
    **{f"invalid UTF-8 {payload!r}": ([(TEXT, payload, True, 0)], 1007) for payload in (
        b"\xff", b'{"type":"ping","x":"\xc3"}', b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
        b"\xc0\xaf")},
    # \xcf is cut short by the closing quote of the last fragment
    "invalid UTF-8 across fragments": ([(TEXT, b'"\xce', False, 0),
                                        (CONTINUATION, b"\xba\xe1\xbd\xb9\xcf", False, 0),
                                        (CONTINUATION, b'"', True, 0)], 1007),
    "binary frame": ([(BINARY, b'{"type":"ping"}', True, 0)], 1003),
}


@pytest.mark.parametrize("name", list(BAD_SEQUENCES))
def test_bad_frame_sequences_close_with_the_contracts_code(shared_server: Server,
                                                           name: str) -> None:
    frames, code = BAD_SEQUENCES[name]
    client = shared_server.connect()
    for opcode, payload, fin, rsv in frames:
        client.send_frame(opcode, payload, fin=fin, rsv=rsv)
    assert_closed_with(client, code)


def test_ping_is_answered_with_its_payload(server: Server) -> None:
    client = server.connect()
    client.send_frame(PING, b"are you there")
    assert client.recv_frame() == (True, PONG, b"are you there")
    client.close()


def test_fragmented_message_is_reassembled(server: Server) -> None:
    client = server.connect()
    client.subscribe("frag")
    publish = json.dumps({"type": "publish", "channel": "frag", "data": "é" * 300}).encode()
    pieces = [publish[i:i + 7] for i in range(0, len(publish), 7)]  # splits UTF-8 sequences
    client.send_frame(TEXT, pieces[0], fin=False)
    client.send_frame(PING, b"between fragments")  # control frames may interleave
    for piece in pieces[1:-1]:
        client.send_frame(CONTINUATION, piece, fin=False)
    client.send_frame(CONTINUATION, pieces[-1])
    assert client.recv_frame() == (True, PONG, b"between fragments")
    assert client.recv_json()["data"] == "é" * 300
    client.close()


def test_message_over_the_limit_closes_1009(limited: Server) -> None:
    client = limited.connect()
    client.send_frame(TEXT, b'{"type":"ping","pad":"' + b"x" * 1000 + b'"}')
    assert_closed_with(client, 1009)


def test_fragments_adding_up_past_the_limit_close_1009(limited: Server) -> None:
    client = limited.connect()
    client.send_frame(TEXT, b"[" + b" " * 599, fin=False)
    client.send_frame(CONTINUATION, b" " * 600)
    assert_closed_with(client, 1009)


def test_message_at_the_limit_is_accepted(limited: Server) -> None:
    client = limited.connect()
    message = b'{"type":"ping","pad":"'
    message += b"x" * (1000 - len(message) - 2) + b'"}'
    assert len(message) == 1000
    client.send_frame(TEXT, message)
    assert client.recv_json() == {"type": "pong"}
    client.close()


def test_a_huge_frame_is_refused_from_its_header(limited: Server) -> None:
    """A 1 GiB length is refused on sight: nothing is buffered waiting for it."""
    client = limited.connect()
    client.sock.sendall(frame_head(TEXT, 1 << 30) + b"mask")
    assert_closed_with(client, 1009)


def test_nothing_follows_the_close_for_a_bad_frame_read_with_a_good_one(
        limited: Server) -> None:
    """picows parses one frame ahead and sends CLOSE for the bad one before we answer the
    good one: the answer must not go out after the CLOSE (found by the fuzzer)."""
    client = limited.connect()
    huge = frame_head(TEXT, 1 << 40) + b"mask"
    client.sock.sendall(frame(TEXT, b'{"type":"ping"}') + huge)  # one write, one read
    opcode = PONG
    while opcode != CLOSE:  # a pong before the CLOSE is allowed, none after it
        _, opcode, payload = client.recv_frame()
        assert opcode in (TEXT, CLOSE)
    assert struct.unpack("!H", payload[:2])[0] == 1009
    assert client.at_eof()

def test_bad_frames_do_not_disturb_other_clients(server: Server) -> None:
    healthy = server.connect()
    healthy.subscribe("calm")
    for opcode, payload, rsv in ((BINARY, b"x", 0), (TEXT, b"\xff", 0), (TEXT, b"{}", 3)):
        bad = server.connect()
        bad.send_frame(opcode, payload, rsv=rsv)
        bad.recv_close()
        bad.close()
    healthy.publish("calm", "still here")
    assert healthy.recv_json()["data"] == "still here"
    healthy.close()


def test_firefox_connection_header_is_accepted(server: Server) -> None:
    client = server.connect(headers={"Connection": "keep-alive, Upgrade"})
    client.send_frame(TEXT, b'{"type":"ping"}')
    assert client.recv_json() == {"type": "pong"}
    client.close()


def test_echo_path_echoes_text_and_binary(start_server: Any) -> None:
    server = start_server("--echo-path", "/echo", "--max-message-size", "100")
    client = RawClient(server.host, server.port, f"/echo?token={token()}")
    client.send_frame(TEXT, "héllo".encode())
    assert client.recv_frame() == (True, TEXT, "héllo".encode())
    client.send_frame(BINARY, b"\x00\xff", fin=False)
    client.send_frame(CONTINUATION, b"\x01")
    assert client.recv_frame() == (True, BINARY, b"\x00\xff\x01")
    client.send_frame(BINARY, b"x" * 101)
    assert_closed_with(client, 1009)


@pytest.mark.slow
def test_echo_path_needs_a_token(start_server: Any) -> None:
    server = start_server("--echo-path", "/echo")
    with pytest.raises(HandshakeRefusedError) as refused:
        RawClient(server.host, server.port, "/echo")
    assert refused.value.status == 401
