"""Property-based abuse over real connections: every message gets the contract's answer,
the server never falls over, and the valid messages around the bad ones still arrive."""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.server import Server
from support.wire import BINARY, CLOSE, TEXT

CHANNEL_CHARS = string.ascii_letters + string.digits + "_-.:@/"
finite = st.floats(allow_nan=False, allow_infinity=False)  # what JSON can carry

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20)
good_channels = st.text(CHANNEL_CHARS, min_size=1, max_size=255)
bad_channels = st.one_of(
    st.just(""), st.text(min_size=256, max_size=300, alphabet=CHANNEL_CHARS),
    st.text(min_size=1, max_size=20).filter(lambda c: any(ch not in CHANNEL_CHARS for ch in c)))
wrong_types = st.one_of(st.integers(), finite, st.booleans(),
                        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(), st.none()))


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# Each case: (text sent, what the reply must be: "error:CODE", "published", or "pong").
cases = st.one_of(
    st.tuples(json_values, good_channels).map(lambda v: (json.dumps(
        {"type": "publish", "channel": "fuzz", "data": v[0], "id": "p", "x": v[1]}),
        "published")),
    st.builds(lambda: (json.dumps({"type": "ping", "id": "q"}), "pong")),
    st.text().filter(lambda t: not _is_json(t)).map(lambda t: (t, "error:400")),
    json_values.filter(lambda v: not isinstance(v, dict)).map(
        lambda v: (json.dumps(v), "error:400")),
    wrong_types.map(lambda v: (json.dumps({"type": "subscribe", "channel": v}), "error:400")),
    wrong_types.map(lambda v: (json.dumps({"type": v, "channel": "a"}), "error:400")),
    bad_channels.map(lambda c: (json.dumps({"type": "publish", "channel": c, "data": 1}),
                                "error:400")),
    st.text(min_size=1, max_size=20).filter(lambda t: t not in (
        "subscribe", "unsubscribe", "publish", "ping")).map(
        lambda t: (json.dumps({"type": t}), "error:400")),
    st.integers(min_value=1000, max_value=5000).map(lambda d: (
        '{"type":"publish","channel":"fuzz","data":' + deep(d) + "}", "error:400")),
    st.integers(min_value=300, max_value=2000).map(lambda n: (
        '{"type":"publish","channel":"fuzz","data":' + "9" * n + ',"id":"p"}', "published")),
)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("fuzz") / "server.log", "--publish-rate", "1000000")
    yield server
    server.stop()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(cases, min_size=1, max_size=30))
def test_each_message_gets_its_answer_and_valid_ones_still_arrive(
        fuzz_server: Server, batch: list[tuple[str, str]]) -> None:
    subscriber, sender = fuzz_server.connect().subscribe("fuzz"), fuzz_server.connect()
    published = []
    for text, expected in batch:
        sender.send_frame(TEXT, text.encode())
        reply: dict[str, Any] = sender.recv_json()
        if expected.startswith("error:"):
            assert reply["type"] == "error", (text[:200], reply)
            assert reply["code"] == int(expected[6:])
        else:
            assert reply["type"] == expected, (text[:200], reply)
        if expected == "published":
            published.append(json.loads(text)["data"] if len(text) < 10_000 else None)
    for data in published:  # every valid publish, in order, byte for byte
        message = subscriber.recv_json()
        assert message["type"] == "message"
        if data is not None:
            assert message["data"] == data
    subscriber.close()
    sender.close()
    assert fuzz_server.get("/health")[0] == 200


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([TEXT, BINARY]))
def test_arbitrary_frame_payloads_get_an_answer_or_a_close(
        fuzz_server: Server, payload: bytes, opcode: int) -> None:
    client = fuzz_server.connect()
    client.send_frame(opcode, payload)
    client.send_json({"type": "ping", "id": "after"})
    _, kind, body = client.recv_frame()
    if kind == CLOSE:  # closed: binary (1003) or invalid UTF-8 (1007), nothing else
        code = int.from_bytes(body[:2], "big")
        assert (code == 1003) if opcode == BINARY else (code == 1007)
    else:
        reply = json.loads(body)
        assert reply["type"] in ("error", "pong")
        if reply["type"] == "error":
            assert reply["code"] == 400
    client.close()
    assert fuzz_server.get("/health")[0] == 200
