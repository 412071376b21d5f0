"""Every message of the contract, with the `websockets` library as the client."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from typing import Any

import pytest
from support.server import Server, messages_of, token
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect


def request(ws: ClientConnection, message: dict[str, Any] | str) -> dict[str, Any]:
    ws.send(message if isinstance(message, str) else json.dumps(message))
    return messages_of(ws, 1)[0]


def test_welcome_names_the_user_and_a_unique_client_id(server: Server) -> None:
    before = int(time.time() * 1000)
    ids = set()
    for _ in range(3):
        with connect(server.url(token=token("bob"))) as ws:
            welcome = json.loads(ws.recv(timeout=5))
            assert welcome["type"] == "welcome"
            assert welcome["data"]["user"] == "bob"
            assert before - 1000 <= welcome["data"]["timestamp"] <= time.time() * 1000 + 1000
            ids.add(welcome["data"]["clientId"])
    assert len(ids) == 3


def test_subscribe_publish_receive_unsubscribe(server: Server) -> None:
    with server.websocket("sub") as subscriber, server.websocket("pub") as publisher:
        assert request(subscriber, {"type": "subscribe", "channel": "chat.room-1"}) == {
            "type": "subscribed", "channel": "chat.room-1"}
        publisher.send(json.dumps({"type": "publish", "channel": "chat.room-1", "data": "hi"}))
        message = messages_of(subscriber, 1)[0]
        assert message["type"] == "message"
        assert message["channel"] == "chat.room-1"
        assert message["data"] == "hi"
        assert message["from"] != ""
        assert abs(message["timestamp"] - time.time() * 1000) < 5000
        assert request(subscriber, {"type": "unsubscribe", "channel": "chat.room-1"}) == {
            "type": "unsubscribed", "channel": "chat.room-1"}
        publisher.send(json.dumps({"type": "publish", "channel": "chat.room-1", "data": "gone"}))
        assert request(subscriber, {"type": "ping"}) == {"type": "pong"}


def test_from_is_the_publishers_client_id(server: Server) -> None:
    with server.websocket() as subscriber, connect(server.url(token=token("pub"))) as publisher:
        publisher_id = json.loads(publisher.recv(timeout=5))["data"]["clientId"]
        request(subscriber, {"type": "subscribe", "channel": "c"})
        publisher.send(json.dumps({"type": "publish", "channel": "c", "data": 1}))
        assert messages_of(subscriber, 1)[0]["from"] == publisher_id


def test_data_is_forwarded_byte_for_byte(server: Server) -> None:
    raw = '{"b" :  [1.50, 2e3,  "\\u00e9\\ud83d\\ude00", null, {"z":1,"a":2}] ,"a":-0.0}'
    with server.websocket() as ws:
        request(ws, {"type": "subscribe", "channel": "raw"})
        ws.send('{"type":"publish","channel":"raw","data":' + raw + "}")
        text = ws.recv(timeout=5)
        assert '"data":' + raw + ',"from":' in text


def test_ids_are_echoed_exactly(server: Server) -> None:
    with server.websocket() as ws:
        assert request(ws, '{"type":"subscribe","channel":"a","id":7}')["id"] == 7
        ws.send('{"type":"publish","channel":"a","data":1,"id":{"k":[1,"x"]}}')
        replies = messages_of(ws, 2)
        assert {r["type"] for r in replies} == {"message", "published"}
        published = next(r for r in replies if r["type"] == "published")
        assert published == {"type": "published", "channel": "a", "id": {"k": [1, "x"]}}
        assert request(ws, {"type": "unsubscribe", "channel": "a", "id": "u"})["id"] == "u"
        assert request(ws, {"type": "ping", "id": 3.5}) == {"type": "pong", "id": 3.5}
        error = request(ws, {"type": "nope", "id": "e1"})
        assert (error["code"], error["id"]) == (400, "e1")


def test_publish_without_id_gets_no_reply(server: Server) -> None:
    with server.websocket() as ws:
        ws.send(json.dumps({"type": "publish", "channel": "quiet", "data": 1}))
        assert request(ws, {"type": "ping"}) == {"type": "pong"}


def test_publisher_subscribed_receives_its_own_messages(server: Server) -> None:
    with server.websocket() as ws:
        request(ws, {"type": "subscribe", "channel": "echo"})
        ws.send(json.dumps({"type": "publish", "channel": "echo", "data": {"n": 1}}))
        assert messages_of(ws, 1)[0]["data"] == {"n": 1}


def test_messages_from_one_publisher_arrive_in_order(server: Server) -> None:
    count = 2000
    with server.websocket("s1") as first, server.websocket("s2") as second, \
            server.websocket("p") as publisher:
        for ws in (first, second):
            request(ws, {"type": "subscribe", "channel": "seq"})
        for i in range(count):
            publisher.send(json.dumps({"type": "publish", "channel": "seq", "data": i}))
        for ws in (first, second):
            assert [m["data"] for m in messages_of(ws, count)] == list(range(count))


def test_many_subscribers_each_get_every_message(server: Server) -> None:
    with ExitStack() as stack:
        subscribers = [stack.enter_context(server.websocket(f"s{i}")) for i in range(50)]
        for ws in subscribers:
            request(ws, {"type": "subscribe", "channel": "wide"})
        publisher = stack.enter_context(server.websocket("p"))
        for i in range(20):
            publisher.send(json.dumps({"type": "publish", "channel": "wide", "data": i}))
        for ws in subscribers:
            assert [m["data"] for m in messages_of(ws, 20)] == list(range(20))


@pytest.mark.parametrize("text, fragment", [
    ("not json", "invalid JSON"),
    ("{\"type\":\"subscribe\"", "invalid JSON"),
    ("[1,2,3]", "invalid message"),
    ("\"subscribe\"", "invalid message"),
    ("{\"channel\":\"a\"}", "invalid message"),
    ("{\"type\":5}", "invalid message"),
    ("{\"type\":\"subscribe\",\"channel\":5}", "invalid message"),
    ("{\"type\":\"subscribe\",\"channel\":[\"a\"]}", "invalid message"),
    ("{\"type\":\"subscribe\"}", "missing 'channel'"),
    ("{\"type\":\"subscribe\",\"channel\":\"\"}", "invalid channel"),
    ("{\"type\":\"subscribe\",\"channel\":\"has space\"}", "invalid channel"),
    ("{\"type\":\"subscribe\",\"channel\":\"caf\u00e9\"}", "invalid channel"),
    ("{\"type\":\"subscribe\",\"channel\":\"" + "x" * 256 + "\"}", "invalid channel"),
    ("{\"type\":\"unsubscribe\",\"channel\":\"a*b\"}", "invalid channel"),
    ("{\"type\":\"publish\",\"channel\":\"a\"}", "needs 'data'"),
    ("{\"type\":\"publish\",\"channel\":\"a b\",\"data\":1}", "invalid channel"),
    ("{\"type\":\"dance\"}", "unknown message type"),
])
def test_bad_requests_get_400_and_the_connection_lives_on(shared_server: Server, text: str,
                                                          fragment: str) -> None:
    with shared_server.websocket() as ws:
        error = request(ws, text)
        assert error["type"] == "error"
        assert error["code"] == 400
        assert fragment in error["message"]
        assert request(ws, {"type": "ping"}) == {"type": "pong"}


def test_longest_channel_name_and_every_allowed_character(server: Server) -> None:
    name = ("AZaz09_-.:@/" * 22)[:255]
    with server.websocket() as ws:
        assert request(ws, {"type": "subscribe", "channel": name})["type"] == "subscribed"
        ws.send(json.dumps({"type": "publish", "channel": name, "data": True}))
        assert messages_of(ws, 1)[0]["channel"] == name


def test_unknown_fields_are_ignored(server: Server) -> None:
    with server.websocket() as ws:
        reply = request(ws, {"type": "subscribe", "channel": "x", "extra": {"deep": [1]}})
        assert reply == {"type": "subscribed", "channel": "x"}


def test_subscribing_twice_holds_one_subscription(server: Server) -> None:
    with server.websocket() as ws:
        request(ws, {"type": "subscribe", "channel": "twice"})
        request(ws, {"type": "subscribe", "channel": "twice"})
        ws.send(json.dumps({"type": "publish", "channel": "twice", "data": 1}))
        assert messages_of(ws, 1)[0]["data"] == 1
        assert request(ws, {"type": "ping"}) == {"type": "pong"}


@pytest.mark.slow
def test_subscription_limit_answers_429(start_server: Any) -> None:
    server = start_server("--max-subscriptions", "3")
    with server.websocket() as ws:
        for name in "abc":
            assert request(ws, {"type": "subscribe", "channel": name})["type"] == "subscribed"
        error = request(ws, {"type": "subscribe", "channel": "d"})
        assert (error["type"], error["code"]) == ("error", 429)
        request(ws, {"type": "unsubscribe", "channel": "a"})
        assert request(ws, {"type": "subscribe", "channel": "d"})["type"] == "subscribed"


def test_permissions_from_the_token(server: Server) -> None:
    with server.websocket("limited", subscribe=["news.*", "room:42"], publish=["room:*"]) as ws:
        assert request(ws, {"type": "subscribe", "channel": "news.sport"})["type"] == "subscribed"
        assert request(ws, {"type": "subscribe", "channel": "room:42"})["type"] == "subscribed"
        denied = request(ws, {"type": "subscribe", "channel": "room:43", "id": 1})
        assert (denied["code"], denied["id"]) == (403, 1)
        assert request(ws, {"type": "subscribe", "channel": "xnews.sport"})["code"] == 403
        denied = request(ws, {"type": "publish", "channel": "news.sport", "data": 1, "id": 2})
        assert (denied["code"], denied["id"]) == (403, 2)
        reply = request(ws, {"type": "publish", "channel": "room:42", "data": 1, "id": 3})
        assert reply["type"] in ("message", "published")


def test_empty_permission_lists_allow_nothing(server: Server) -> None:
    with server.websocket("reader", subscribe=[], publish=[]) as ws:
        assert request(ws, {"type": "subscribe", "channel": "a"})["code"] == 403
        assert request(ws, {"type": "publish", "channel": "a", "data": 1})["code"] == 403


@pytest.mark.slow
def test_publish_rate_limit_answers_429_then_closes_4029(start_server: Any) -> None:
    server = start_server("--publish-rate", "10")
    with server.websocket() as ws:
        for i in range(20):  # the burst: twice the rate
            ws.send(json.dumps({"type": "publish", "channel": "r", "data": i}))
        error = request(ws, {"type": "publish", "channel": "r", "data": 0, "id": "over"})
        assert (error["code"], error["id"]) == (429, "over")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # keep flooding at 10x the rate
            try:
                ws.send(json.dumps({"type": "publish", "channel": "r", "data": 0}))
                while True:
                    ws.recv(timeout=0.01)  # drain the 429s
            except TimeoutError:
                continue
            except ConnectionClosed:
                break
        assert ws.close_code == 4029
    assert server.metrics()['fastfan_dropped_total{reason="rate_limited"}'] >= 1
