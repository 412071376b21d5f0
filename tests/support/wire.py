"""Bytes on the wire, made and read by hand: WebSocket frames, a client on a bare socket for
frames no polite library will send, Redis's RESP, and a free port to listen on.

The standard library only: fuzz/ builds its seeds and reads the server's frames with this
module too, in a venv that has none of the tests' dependencies.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import zlib
from typing import Any, NamedTuple

TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
RSV1 = 0b100  # in Frame.rsv (RSV1..RSV3 as bits 2..0): permessage-deflate's "compressed"
ZERO_KEY = bytes(4)  # the masking key that leaves a payload as it is: readable fuzz inputs


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
          masked: bool = True, key: bytes | None = None) -> bytes:
    """A client frame, masked with `key` (a random one when None); `masked=False` makes the
    unmasked frame a client must not send."""
    head = frame_head(opcode, len(payload), fin=fin, rsv=rsv, masked=masked)
    if not masked:
        return head + payload
    key = os.urandom(4) if key is None else key
    return head + key + apply_mask(payload, key)


def frame_head(opcode: int, size: int, *, fin: bool = True, rsv: int = 0,
               masked: bool = True) -> bytes:
    """A frame's header up to its masking key: alone, it announces a payload never sent."""
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mask_bit = 0x80 if masked else 0
    if size < 126:
        return head + bytes([mask_bit | size])
    if size < 65536:
        return head + bytes([mask_bit | 126]) + struct.pack("!H", size)
    return head + bytes([mask_bit | 127]) + struct.pack("!Q", size)


def apply_mask(payload: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte key repeated (RFC 6455 5.3): masks and unmasks alike."""
    size = len(payload)
    repeated = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(size, "big")


class Frame(NamedTuple):
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes  # unmasked
    size: int  # bytes on the wire, header included


def parse_frame(data: bytes | bytearray, at: int = 0) -> Frame | None:
    """The frame that starts at `data[at]`, or None while some of its bytes have not come."""
    if len(data) - at < 2:
        return None
    first, second = data[at], data[at + 1]
    length, head = second & 0x7F, 2
    if length >= 126:
        form = "!H" if length == 126 else "!Q"
        head += struct.calcsize(form)
        if len(data) - at < head:
            return None
        (length,) = struct.unpack_from(form, data, at + 2)
    masked = bool(second & 0x80)
    head += 4 if masked else 0
    if len(data) - at < head + length:
        return None
    key = bytes(data[at + head - 4:at + head]) if masked else b""
    payload = bytes(data[at + head:at + head + length])
    return Frame(bool(first & 0x80), (first >> 4) & 0x7, first & 0x0F, masked,
                 apply_mask(payload, key) if masked else payload, head + length)


def deflate(data: bytes, window_bits: int = 15) -> bytes:
    """One message compressed as permessage-deflate sends it (RFC 7692 7.2.1): raw deflate,
    a sync flush, its 4-byte tail removed (zlib's defaults otherwise, as the server's)."""
    compressor = zlib.compressobj(wbits=-window_bits)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def inflate(payload: bytes) -> bytes:
    """A permessage-deflate message's payload, inflated (RFC 7692 7.2.2)."""
    return zlib.decompressobj(wbits=-15).decompress(payload + b"\x00\x00\xff\xff")


def resp(*parts: str | bytes) -> bytes:
    """A command in RESP, as Redis reads it: an array of bulk strings."""
    encoded = [p.encode() if isinstance(p, str) else p for p in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in encoded)


def port_slice(first: int, last: int) -> range:
    """This test process's share of the ports first..last: under pytest-xdist each process
    (gw0, gw1...) takes its own slice, so two never hand out the same port."""
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    size = (last - first) // count
    return range(first + index * size, first + (index + 1) * size)


_GIVEN = port_slice(2000, 11999)  # below the cluster's ports (support.redis.cluster_ports)
_next_port = _GIVEN.start + os.getpid() % len(_GIVEN)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server about to start: the next one of this
    process's slice below the kernel's ephemeral range (32768 on). The kernel's own pick
    (bind to 0) may come back twice in a row, or be taken meanwhile by another process's
    test or by an outgoing connection; these are never handed out twice in a run."""
    global _next_port
    for _ in range(len(_GIVEN)):
        port = _next_port
        _next_port = port + 1 if port + 1 < _GIVEN.stop else _GIVEN.start
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    raise OSError(f"no free port in {_GIVEN}")


class HandshakeRefusedError(Exception):
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body!r}")
        self.status, self.headers, self.body = status, headers, body


class RawClient:
    def __init__(self, host: str, port: int, path: str = "/",
                 headers: dict[str, str] | None = None, timeout: float = 5.0,
                 receive_buffer: int | None = None, source: str | None = None) -> None:
        self.sock = socket.socket()
        if source is not None:  # another 127.0.0.x: a fresh set of ephemeral ports
            self.sock.bind((source, 0))
        if receive_buffer is not None:  # a small window: the server's output backs up sooner
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.buffer = b""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        defaults = {line.split(":")[0].lower(): line for line in lines[2:]}
        for name, value in (headers or {}).items():
            defaults[name.lower()] = f"{name}: {value}"
        request = "\r\n".join([*lines[:2], *defaults.values()]) + "\r\n\r\n"
        self.sock.sendall(request.encode())
        head = self._read_until(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        self.headers = {k.strip().lower(): v.strip()
                        for k, v in (line.split(":", 1) for line in header_lines if line)}
        if status != 101:
            length = int(self.headers.get("content-length", "0"))
            body = self.buffer[:length] if length else self.buffer
            while length and len(body) < length:
                body += self.sock.recv(65536)
            raise HandshakeRefusedError(status, self.headers, body)

    def _receive(self, closed: str) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(closed)
        self.buffer += chunk

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._receive("closed during handshake")
        head, self.buffer = self.buffer.split(marker, 1)
        return head

    def send_frame(self, opcode: int, payload: bytes = b"", *, fin: bool = True,
                   rsv: int = 0) -> None:
        self.sock.sendall(frame(opcode, payload, fin=fin, rsv=rsv))

    def send_json(self, message: Any) -> None:
        self.send_frame(TEXT, json.dumps(message).encode())

    def send_json_burst(self, messages: list[Any]) -> None:
        """Many messages in one write, so they reach the server together."""
        self.sock.sendall(b"".join(frame(TEXT, json.dumps(m).encode()) for m in messages))

    def subscribe(self, *channels: str) -> RawClient:
        """Subscribes to each channel in turn, each answered with `subscribed`."""
        for channel in channels:
            self.send_json({"type": "subscribe", "channel": channel})
            assert self.recv_json() == {"type": "subscribed", "channel": channel}
        return self

    def publish(self, channel: str, data: Any, **fields: Any) -> None:
        """Sends a publish (with `id=...` among `fields` to be answered); reads nothing."""
        self.send_json({"type": "publish", "channel": channel, "data": data, **fields})

    def recv_frame(self) -> tuple[bool, int, bytes]:
        got = self.recv_whole_frame()
        return got.fin, got.opcode, got.payload

    def recv_whole_frame(self) -> Frame:
        """The next frame as it came, its RSV bits and size on the wire included."""
        while (got := parse_frame(self.buffer)) is None:
            self._receive("connection closed")
        self.buffer = self.buffer[got.size:]
        return got

    def recv_json(self) -> Any:
        """The next frame, a whole text message (inflated if compressed: RSV1), as JSON."""
        got = self.recv_whole_frame()
        assert (got.fin, got.opcode) == (True, TEXT), got
        return json.loads(inflate(got.payload) if got.rsv & RSV1 else got.payload)

    def recv_close(self) -> tuple[int, str]:
        """Skip data frames until the server's CLOSE; return its code and reason."""
        while True:
            _, opcode, payload = self.recv_frame()
            if opcode == CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                return code, payload[2:].decode()

    def at_eof(self) -> bool:
        """True when the server has closed the TCP connection (after a CLOSE exchange)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return False

    def close(self) -> None:
        self.sock.close()
