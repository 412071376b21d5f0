"""Write the hand-made seeds of fuzz/corpus/: one file per kind of input a client can send.

    python fuzz/seeds.py      # (re)writes fuzz/corpus/seed-*; the fuzzer adds the rest

Frames use the all-zero masking key, so the payloads read as they are and a mutation of
the JSON stays JSON-like.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' frame builder, wire.py

import wire  # noqa: E402
from wire import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT  # noqa: E402


def frame(opcode: int, payload: bytes = b"", **options: Any) -> bytes:
    """A client frame with the all-zero masking key: its payload reads as it is."""
    return wire.frame(opcode, payload, key=wire.ZERO_KEY, **options)


def text(message: object) -> bytes:
    return frame(TEXT, json.dumps(message, separators=(",", ":")).encode())


SEEDS: dict[str, bytes] = {
    "conversation": b"".join([
        text({"type": "subscribe", "channel": "news"}),
        text({"type": "publish", "channel": "news", "data": {"n": 1, "s": "é"}, "id": "a1"}),
        text({"type": "ping"}),
        text({"type": "unsubscribe", "channel": "news"}),
        frame(CLOSE, struct.pack("!H", 1000) + b"bye"),
    ]),
    "connection-manager": b"".join([
        text({"type": "subscribe", "channel": "room", "joinLeave": True, "id": 1}),
        text({"type": "presence", "channel": "room", "id": 2}),
        text({"type": "presence_stats", "channel": "room"}),
        text({"type": "publish", "channel": "room", "data": [1], "echo": False}),
        text({"type": "stats", "id": {"n": 3}}),
        text({"type": "refresh", "token": "not.a.token", "id": 4}),
        text({"type": "subscribe", "channel": "x", "joinLeave": "yes"}),
    ]),
    "history": b"".join([
        text({"type": "subscribe", "channel": "h1", "id": 1}),
        text({"type": "publish", "channel": "h1", "data": "x", "id": 2}),
        text({"type": "history", "channel": "h1", "limit": 2, "id": 3}),
        text({"type": "history", "channel": "h1", "since": 0, "epoch": "e"}),
        text({"type": "subscribe", "channel": "h2", "recover": {"offset": 3, "epoch": "e"}}),
        text({"type": "unsubscribe", "channel": "h2"}),
        text({"type": "subscribe", "channel": "h3", "recover": {"offset": "3"}}),
        text({"type": "history", "channel": "plain", "since": -1}),
    ]),
    "fragmented-with-ping": b"".join([
        frame(TEXT, b'{"type":"publish",', fin=False),
        frame(PING, b"in between"),
        frame(CONTINUATION, b'"channel":"c","data":', fin=False),
        frame(CONTINUATION, b"[1,2,3]}"),
    ]),
    "utf8-split-across-fragments": frame(TEXT, b'{"type":"publish","channel":"\xc3', fin=False)
    + frame(CONTINUATION, b'\xa9","data":1}'),
    "invalid-utf8": frame(TEXT, b'{"type":"ping","x":"\xff\xfe"}'),
    "binary": frame(BINARY, b'{"type":"ping"}'),
    "wrong-types": b"".join(text(m) for m in [
        {"type": "publish", "channel": 5, "data": 1},
        {"type": 7},
        {"type": "subscribe", "channel": ["a"]},
        {"type": "publish", "channel": "c", "data": 1, "id": {"x": 1}},
        {"type": "subscribe", "channel": ""},
        {"type": "subscribe", "channel": "a b\u0000"},
        [1, 2],
        "ping",
    ]),
    "malformed-json": b"".join(frame(TEXT, p) for p in [
        b"{", b'{"type":"ping",}', b"nul", b'{"type":"ping"}{"type":"ping"}',
        b"[" * 2000, b'{"type":"publish","channel":"c","data":1e999999}',
        b'{"type":"publish","channel":"c","data":123456789012345678901234567890}',
    ]),
    "publish-flood": b"".join(
        text({"type": "publish", "channel": "f", "data": n, "id": n}) for n in range(14)),
    "subscription-limit": b"".join(
        text({"type": "subscribe", "channel": f"c{n}"}) for n in range(10)),
    "too-big": frame(TEXT, b'{"type":"publish","channel":"c","data":"' + b"x" * 5000 + b'"}'),
    "long-length-fields": frame(TEXT, json.dumps({"type": "ping", "pad": "p" * 200}).encode())
    + wire.frame_head(TEXT, 1 << 40) + wire.ZERO_KEY,
    "rsv-bits": frame(TEXT, b'{"type":"ping"}', rsv=4),
    "unmasked": frame(TEXT, b'{"type":"ping"}', masked=False),
    "reserved-opcode": frame(0x3, b"") + frame(0xB, b""),
    "control-too-long": frame(PING, b"p" * 126),
    "fragmented-control": frame(PING, b"p", fin=False),
    "continuation-without-start": frame(CONTINUATION, b'{"type":"ping"}'),
    "close-codes": frame(CLOSE, struct.pack("!H", 1005)) + frame(CLOSE, b"\x03"),
    "close-invalid-reason": frame(CLOSE, struct.pack("!H", 1000) + b"\xff"),
    "pong-unsolicited": frame(PONG, b"hello") + text({"type": "ping"}),
    "truncated": frame(TEXT, b'{"type":"ping"}')[:5],
}


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    for name, data in SEEDS.items():
        (CORPUS / f"seed-{name}").write_bytes(data)
    print(f"{len(SEEDS)} seeds in {CORPUS}")


if __name__ == "__main__":
    main()
