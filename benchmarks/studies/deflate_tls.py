"""The wire: what permessage-deflate and TLS cost, against plain.

    ./dev bench --scenarios wire --subscribers 500 --duration 3
"""

from __future__ import annotations

import json
import multiprocessing
import os
import selectors
import socket
import subprocess
import tempfile
import time
from typing import Any

from lib import SERVER_CPU, cpu_seconds, fastfan_command, free_port, pinned, wait_listening

from .common import stop, text_frame

WIRE_MODES = {  # mode -> (TLS, offer permessage-deflate)
    "plain": (False, False), "deflate": (False, True),
    "tls": (True, False), "tls+deflate": (True, True),
}
_OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"


def _wire_data(seq: int, size: int) -> dict[str, Any]:
    """A chat-like message of about `size` bytes: words that repeat, numbers that do not."""
    words = ("price", "update", "order", "filled", "market", "limit", "buy", "sell", "book")
    text = " ".join(f"{words[(seq * 7 + i) % len(words)]}:{(seq * 31 + i * 17) % 10007}"
                    for i in range(size // 12))
    return {"seq": seq, "user": f"user{seq % 97}", "text": text[:size]}


def _wire_connect(port: int, tls: bool, deflate: bool) -> socket.socket:
    """A WebSocket connection on a bare (or TLS-wrapped) socket, its 101 read."""
    import ssl

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # a throwaway self-signed certificate
        sock = context.wrap_socket(sock)
    sock.sendall(("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  f"Sec-WebSocket-Version: 13\r\n{_OFFER if deflate else ''}\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    assert (b"permessage-deflate" in head) == deflate, head
    return sock


def _wire_subscribers(port: int, count: int, tls: bool, deflate: bool, seconds: float,
                      ready: Any, result: Any) -> None:
    """`count` subscribers reading everything for `seconds` after `ready` is set: the bytes."""
    import ssl

    os.sched_setaffinity(0, {1})  # the load generator's CPU
    selector = selectors.DefaultSelector()
    for _ in range(count):
        sock = _wire_connect(port, tls, deflate)
        sock.sendall(text_frame(b'{"type":"subscribe","channel":"wire"}'))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    time.sleep(0.5)  # the subscribed replies are in
    for key, _ in selector.select(0):
        try:
            while key.fileobj.recv(1 << 18):  # type: ignore[union-attr]
                pass
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
    ready.set()
    received, stop_at = 0, time.monotonic() + seconds
    while time.monotonic() < stop_at:
        for key, _ in selector.select(0.1):
            try:
                while data := key.fileobj.recv(1 << 18):  # type: ignore[union-attr]
                    received += len(data)
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
    result.value = received


def wire(subscribers: int = 500, duration: float = 3.0, size: int = 1000,
         rate: float = 100) -> list[dict[str, Any]]:
    """What permessage-deflate and TLS cost: `subscribers` on one channel (Python clients on
    the load generator's CPU, reading everything) get `rate` messages/s of about `size`
    bytes of chat-like JSON, plain, all with permessage-deflate, over TLS, and both. The
    server's CPU per delivery and the bytes on the wire per delivery, against plain."""
    rows: list[dict[str, Any]] = []
    print(f"\nwire: {subscribers} subscribers, {rate:g} messages/s of ~{size} bytes, "
          f"{duration:g} s per mode")
    print(f"{'mode':>12} {'deliveries':>10} {'CPU us/deliv':>12} {'vs plain':>8} "
          f"{'wire B/deliv':>12} {'vs plain':>8}")
    with tempfile.TemporaryDirectory() as keys:
        cert, key = os.path.join(keys, "cert.pem"), os.path.join(keys, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=127.0.0.1"], check=True,
                       capture_output=True)
        for mode, (tls, deflate) in WIRE_MODES.items():
            port = free_port()
            server = subprocess.Popen(
                fastfan_command(port, ["--tls-cert", cert, "--tls-key", key] if tls else []),
                preexec_fn=pinned(SERVER_CPU))
            try:
                wait_listening(port, server)
                rows.append(_wire_run(mode, port, server.pid, subscribers, duration, size,
                                      rate, tls, deflate))
            finally:
                stop(server)
            plain = rows[0]
            row = rows[-1]
            row["cpu_vs_plain"] = round(row["cpu_us_per_delivery"]
                                        / plain["cpu_us_per_delivery"], 2)
            row["bytes_vs_plain"] = round(row["wire_bytes_per_delivery"]
                                          / plain["wire_bytes_per_delivery"], 2)
            print(f"{mode:>12} {row['deliveries']:>10} {row['cpu_us_per_delivery']:>12.3f} "
                  f"{row['cpu_vs_plain']:>8.2f} {row['wire_bytes_per_delivery']:>12.1f} "
                  f"{row['bytes_vs_plain']:>8.2f}", flush=True)
    return rows


def _wire_run(mode: str, port: int, pid: int, subscribers: int, duration: float, size: int,
              rate: float, tls: bool, deflate: bool) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    ready, received = context.Event(), context.Value("q", 0)
    reader = context.Process(target=_wire_subscribers, args=(
        port, subscribers, tls, deflate, duration + 2, ready, received))
    reader.start()
    publisher = _wire_connect(port, tls, False)
    if not ready.wait(60):
        reader.kill()
        raise RuntimeError("wire: the subscribers did not connect")
    frames = [text_frame(json.dumps({"type": "publish", "channel": "wire",
                                     "data": _wire_data(seq, size)}).encode())
              for seq in range(int(rate * duration))]
    before, started = cpu_seconds(pid), time.monotonic()
    for seq, frame in enumerate(frames):
        publisher.sendall(frame)
        time.sleep(max(0.0, started + (seq + 1) / rate - time.monotonic()))
    time.sleep(1)  # the last messages written
    used = cpu_seconds(pid) - before
    reader.join()
    publisher.close()
    deliveries = len(frames) * subscribers
    return {"scenario": "wire", "mode": mode, "subscribers": subscribers, "size": size,
            "deliveries": deliveries, "received_bytes": received.value,
            "cpu_us_per_delivery": round(1e6 * used / deliveries, 3),
            "wire_bytes_per_delivery": round(received.value / deliveries, 1)}
