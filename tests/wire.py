"""A WebSocket client on a bare socket, for frames no polite library will send."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from typing import Any

TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0) -> bytes:
    """A masked client frame."""
    header = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    if n < 126:
        header += bytes([0x80 | n])
    elif n < 65536:
        header += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        header += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


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

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during handshake")
            self.buffer += chunk
        head, self.buffer = self.buffer.split(marker, 1)
        return head

    def _read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send_frame(self, opcode: int, payload: bytes = b"", *, fin: bool = True,
                   rsv: int = 0) -> None:
        self.sock.sendall(frame(opcode, payload, fin=fin, rsv=rsv))

    def send_json(self, message: Any) -> None:
        self.send_frame(TEXT, json.dumps(message).encode())

    def send_json_burst(self, messages: list[Any]) -> None:
        """Many messages in one write, so they reach the server together."""
        self.sock.sendall(b"".join(frame(TEXT, json.dumps(m).encode()) for m in messages))

    def recv_frame(self) -> tuple[bool, int, bytes]:
        first, second = self._read_exactly(2)
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read_exactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read_exactly(8))
        return bool(first & 0x80), first & 0x0F, self._read_exactly(n)

    def recv_json(self) -> Any:
        fin, opcode, payload = self.recv_frame()
        assert (fin, opcode) == (True, TEXT), (fin, opcode, payload)
        return json.loads(payload)

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
