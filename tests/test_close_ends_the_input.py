"""The client's CLOSE is its last frame: whatever shares its read is ignored.

Autobahn case 7.1.2 sends two CLOSE frames; when they reach the server in one read, picows
2.3.1 parsed the second before handing us the first and answered it with 1002 itself, so
the client never got its own code back. Here every follower is sent with the CLOSE in one
send() on loopback (one segment, one read): deterministic, where Autobahn's timing is not.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.server import Server, token
from support.wire import CLOSE, PING, TEXT, RawClient, frame


def close(code: int, reason: bytes = b"") -> bytes:
    return frame(CLOSE, struct.pack("!H", code) + reason)


FOLLOWERS = {
    "a second CLOSE (Autobahn 7.1.2)": close(1000),
    "a second CLOSE with another code": close(1001, b"again"),
    "an empty CLOSE": frame(CLOSE),
    "a CLOSE with an invalid code": close(999),
    "a text message": frame(TEXT, b'{"type":"ping"}'),
    "a ping": frame(PING, b"hello"),
    "a text message, then a CLOSE": frame(TEXT, b'{"type":"ping"}') + close(1000),
    "a reserved opcode": frame(0x3, b"x"),
    "an unmasked frame": bytes([0x81, 0x02]) + b"hi",
    "a fragmented ping": frame(PING, b"x", fin=False),
    "a frame of 2**40 bytes": bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 1 << 40) + b"mask",
    "bytes that are no frame": b"\xff" * 64,
    "half a frame": frame(TEXT, b'{"type":"ping"}')[:5],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = Path(tmp_path_factory.mktemp("close")) / "server.log"
    server = Server(log, "--echo-path", "/echo")
    yield server
    server.stop()


def connect(server: Server, path: str) -> RawClient:
    if path == "/echo":
        return RawClient(server.host, server.port, f"/echo?token={token()}")
    client = RawClient(server.host, server.port, "/", {"Authorization": f"Bearer {token()}"})
    assert client.recv_json()["type"] == "welcome"
    return client


def rest_of_stream(client: RawClient) -> bytes:
    """Every byte the server sends until it closes the TCP connection."""
    data = client.buffer
    while True:
        try:
            chunk = client.sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the server kept the connection open after {data!r}")
        except ConnectionResetError:
            pytest.fail(f"the server reset the connection after {data!r}")
        if not chunk:
            return data
        data += chunk


@pytest.mark.parametrize("path", ["/", "/echo"])
@pytest.mark.parametrize("follower", FOLLOWERS.values(), ids=FOLLOWERS.keys())
def test_one_close_with_the_clients_code_then_eof(server: Server, path: str,
                                                  follower: bytes) -> None:
    client = connect(server, path)
    data = close(1000, b"bye") + follower
    client.sock.settimeout(5)
    assert client.sock.send(data) == len(data)  # one send(): one segment, one read
    # The server's CLOSE carries our code (and no reason: fastfan sends none); nothing follows.
    assert rest_of_stream(client) == bytes([0x88, 2]) + struct.pack("!H", 1000)
    client.close()


def test_the_server_still_serves_after_all_that(server: Server) -> None:
    client = connect(server, "/")
    client.send_frame(TEXT, b'{"type":"ping"}')
    assert client.recv_json() == {"type": "pong"}
    client.sock.shutdown(socket.SHUT_WR)
    client.close()
    assert "Traceback" not in server.log()
    assert "ERROR" not in server.log()
