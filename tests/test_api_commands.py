"""The server API's deployment-wide methods: disconnect, unsubscribe, presence and
presence_stats, on every worker (the embedded bus) and every node (Redis)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from support.api import assert_error, call, start_api
from support.messages import alive, closed_by_api
from support.redis import RedisServer
from support.waiting import wait_for
from support.wire import RawClient
from support.workers import every, place


def quiet(client: RawClient, wait: float = 0.3) -> bool:
    """Nothing arrives for `wait` seconds."""
    client.sock.settimeout(wait)
    try:
        client.recv_frame()
    except TimeoutError:
        return True
    finally:
        client.sock.settimeout(5)
    return False


def api_presence(port: int, channel: str, method: str = "presence") -> Any:
    status, answer = call(port, method, {"channel": channel})
    assert status == 200, answer
    return answer["result"]


def ws_presence(client: RawClient, channel: str, kind: str = "presence") -> Any:
    client.send_json({"type": kind, "channel": channel})
    reply = client.recv_json()
    assert reply["type"] == kind, reply
    return reply["data"]


def by_client(data: dict[str, Any]) -> dict[str, Any]:
    """Presence data with its clients in a set order (workers answer in any order)."""
    return {**data, "clients": sorted(data["clients"], key=lambda c: c["clientId"])}


# disconnect ---------------------------------------------------------------------------

@pytest.mark.slow
def test_disconnect_closes_the_users_connections_on_every_worker(start_server: Any) -> None:
    server, port = start_api(start_server, "--workers", "2")
    alice = place(server, 2, "alice", ("room",))
    bob = place(server, 1, "bob", ("room",))
    assert call(port, "disconnect", {"user": "alice"}) == (200, {"result": {}})
    for client in every(alice):
        closed_by_api(client)
    for client in every(bob):
        assert alive(client)
    # bob still receives; alice, gone, is not in presence anywhere
    assert call(port, "publish", {"channel": "room", "data": "still here"})[0] == 200
    for client in every(bob):
        assert client.recv_json()["data"] == "still here"
    bobs = len(every(bob))
    wait_for(lambda: api_presence(port, "room", "presence_stats") == {"count": bobs,
                                                                       "users": 1}, timeout=2)
    # alice may come back: a disconnect is not a ban
    again = server.connect("alice")
    assert alive(again)
    # a user with no connection anywhere: nothing to do, still {}
    assert call(port, "disconnect", {"user": "nobody"}) == (200, {"result": {}})
    for client in every(bob):
        assert alive(client)


@pytest.mark.slow
def test_disconnect_of_a_user_with_a_long_name_crosses_the_bus(start_server: Any) -> None:
    # A name near a token's length makes a bus record longer than the largest message.
    server, port = start_api(start_server, "--workers", "2", "--max-message-size", "1000")
    long_name = "u" * 5500
    placed = place(server, 1, long_name)
    other = place(server, 1, "bob")
    assert call(port, "disconnect", {"user": long_name}) == (200, {"result": {}})
    for client in every(placed):
        closed_by_api(client)
    for client in every(other):
        assert alive(client)
    assert "dropped the connection" not in server.log()


@pytest.mark.slow
def test_disconnect_through_redis_reaches_every_node(
        start_server: Any, redis_server: RedisServer) -> None:
    near, port = start_api(start_server, "--redis", redis_server.url)
    far = start_server("--redis", redis_server.url, "--workers", "2")
    near.wait_ready()
    far.wait_ready()
    alice = [near.connect("alice"), *every(place(far, 1, "alice"))]
    bob = [near.connect("bob"), far.connect("bob")]
    assert call(port, "disconnect", {"user": "alice"}) == (200, {"result": {}})
    for client in alice:
        closed_by_api(client)
    for client in bob:
        assert alive(client)
    # Redis down: the command cannot reach the other nodes, and says so
    redis_server.kill()
    _, answer = wait_for(lambda: (r := call(port, "disconnect", {"user": "bob"}))[0] == 503
                         and r, timeout=10)
    assert_error(answer, 503, "bus")
    for client in bob:
        assert alive(client)


# unsubscribe --------------------------------------------------------------------------

def unsubscribed(channel: str) -> dict[str, str]:
    return {"type": "unsubscribed", "channel": channel, "reason": "server"}


@pytest.mark.slow
def test_unsubscribe_ends_the_users_subscriptions_on_every_worker(start_server: Any) -> None:
    server, port = start_api(start_server, "--workers", "2")
    alice = place(server, 2, "alice", ("room", "other"), options={"joinLeave": True})
    bob = place(server, 1, "bob", ("room",))
    assert call(port, "unsubscribe", {"user": "alice", "channel": "room"}) == (
        200, {"result": {}})
    for client in every(alice):
        # joinLeave: the joins of those who came after, and the other alices' leaves, may
        # come first; then the `unsubscribed`
        while (message := client.recv_json())["type"] in ("join", "leave"):
            pass
        assert message == unsubscribed("room")
    for client in every(bob):
        assert quiet(client)  # bob's subscription is untouched, and told nothing
    # Publishes on room reach bob, no longer alice; other still reaches alice.
    assert call(port, "publish", {"channel": "room", "data": "after"})[0] == 200
    assert call(port, "publish", {"channel": "other", "data": "elsewhere"})[0] == 200
    for client in every(bob):
        assert client.recv_json()["data"] == "after"
    for client in every(alice):
        message = client.recv_json()
        assert (message["type"], message["channel"], message["data"]) == (
            "message", "other", "elsewhere")
    # ... and the join/leave watch of room ended too: bob leaving is not told to alice
    for client in every(bob):
        client.close()
    for client in every(alice):
        assert quiet(client)
        client.send_json({"type": "stats"})
        assert client.recv_json()["data"]["channels"] == ["other"]
    wait_for(lambda: api_presence(port, "room", "presence_stats") == {"count": 0, "users": 0},
             timeout=2)


@pytest.mark.slow
def test_unsubscribe_through_redis_reaches_every_node(
        start_server: Any, redis_server: RedisServer) -> None:
    near, port = start_api(start_server, "--redis", redis_server.url)
    far = start_server("--redis", redis_server.url)
    near.wait_ready()
    far.wait_ready()
    alice = [near.connect("alice").subscribe("room"), far.connect("alice").subscribe("room")]
    bob = far.connect("bob").subscribe("room")
    assert call(port, "unsubscribe", {"user": "alice", "channel": "room"}) == (
        200, {"result": {}})
    for client in alice:
        assert client.recv_json() == unsubscribed("room")
    assert call(port, "publish", {"channel": "room", "data": "after"})[0] == 200
    assert bob.recv_json()["data"] == "after"
    for client in alice:
        assert quiet(client)


@pytest.mark.slow
def test_unsubscribe_of_a_channel_the_user_is_not_in_does_nothing(
        start_server: Any) -> None:
    server, port = start_api(start_server)
    alice = server.connect("alice").subscribe("room")
    assert call(port, "unsubscribe", {"user": "alice", "channel": "elsewhere"}) == (
        200, {"result": {}})
    assert call(port, "unsubscribe", {"user": "bob", "channel": "room"})[0] == 200
    assert quiet(alice)
    assert call(port, "publish", {"channel": "room", "data": 1})[0] == 200
    assert alice.recv_json()["data"] == 1


# presence -----------------------------------------------------------------------------

@pytest.mark.slow
def test_presence_through_the_api_is_the_websockets(start_server: Any) -> None:
    server, port = start_api(start_server, "--workers", "2")
    members = [*every(place(server, 2, "alice", ("room",))),
               *every(place(server, 1, "bob", ("room",)))]
    asker = server.connect("carol")
    expected = by_client(ws_presence(asker, "room"))
    assert (expected["count"], expected["users"]) == (len(members), 2)
    assert by_client(api_presence(port, "room")) == expected
    assert api_presence(port, "room", "presence_stats") == {"count": expected["count"],
                                                            "users": 2}
    assert api_presence(port, "empty") == {"count": 0, "users": 0, "clients": []}


@pytest.mark.slow
def test_presence_through_the_api_across_nodes(
        start_server: Any, redis_server: RedisServer) -> None:
    near, port = start_api(start_server, "--redis", redis_server.url, "--presence-limit", "2")
    far = start_server("--redis", redis_server.url, "--presence-limit", "2")
    near.wait_ready()
    far.wait_ready()
    members = [near.connect("alice").subscribe("room"), far.connect("bob").subscribe("room"),
               far.connect("carol").subscribe("room")]
    wait_for(lambda: api_presence(port, "room", "presence_stats") == {"count": 3, "users": 3},
             timeout=2)
    data = api_presence(port, "room")
    assert (data["count"], data["users"], len(data["clients"]), data["truncated"]) == (
        3, 3, 2, True)
    asker = far.connect("dan")
    assert ws_presence(asker, "room", "presence_stats") == {"count": 3, "users": 3}
    members[0].close()
    wait_for(lambda: api_presence(port, "room", "presence_stats") == {"count": 2, "users": 2},
             timeout=2)


@pytest.mark.slow
def test_presence_needs_a_presence_channel(start_server: Any) -> None:
    _, port = start_api(start_server, "--presence-channels", "room")
    status, answer = call(port, "presence", {"channel": "other"})
    assert status == 400
    assert_error(answer, 400, "--presence-channels")
    assert api_presence(port, "room") == {"count": 0, "users": 0, "clients": []}


# bodies -------------------------------------------------------------------------------

BAD_BODIES = [
    ("disconnect", b"{}", ["user"]),
    ("disconnect", b'{"user": ""}', ["user"]),
    ("disconnect", b'{"user": 7}', ["user"]),
    ("disconnect", b"[1]", ["object"]),
    ("disconnect", b"{nope", ["malformed"]),
    ("disconnect", json.dumps({"user": "u" * 9000}).encode(), ["longer than a token"]),
    ("unsubscribe", b'{"user": "alice"}', ["channel"]),
    ("unsubscribe", b'{"channel": "room"}', ["user"]),
    ("unsubscribe", b'{"user": "", "channel": "room"}', ["user"]),
    ("unsubscribe", b'{"user": "alice", "channel": "bad name!"}', ["invalid channel"]),
    ("unsubscribe", b'{"user": "alice", "channel": "#room"}', ["invalid channel"]),
    ("presence", b"{}", ["channel"]),
    ("presence", b'{"channel": ""}', ["invalid channel"]),
    ("presence_stats", b'{"channel": "no way"}', ["invalid channel"]),
]


@pytest.mark.slow
def test_bad_bodies_get_400_and_do_nothing(start_server: Any) -> None:
    server, port = start_api(start_server)
    alice = server.connect("alice").subscribe("room")
    for method, body, words in BAD_BODIES:
        status, answer = call(port, method, raw=body)
        assert status == 400, (method, body)
        assert_error(answer, 400, *words)
    assert quiet(alice)
    assert alive(alice)


@pytest.mark.parametrize("method", ["disconnect", "unsubscribe"])
@pytest.mark.slow
def test_commands_need_the_key(start_server: Any, method: str) -> None:
    server, port = start_api(start_server)
    alice = server.connect("alice").subscribe("room")
    status, _ = call(port, method, {"user": "alice", "channel": "room"},
                     headers={"Authorization": "apikey wrong"})
    assert status == 401
    assert quiet(alice)
    assert alive(alice)


@pytest.mark.slow
def test_a_command_from_redis_that_is_not_one_is_dropped(
        start_server: Any, redis_server: RedisServer) -> None:
    server = start_server("--redis", redis_server.url)
    server.wait_ready()
    alice = server.connect("alice").subscribe("room")
    for junk in ('{"command":"explode","user":"alice"}', '{"command":"disconnect"}',
                 '{"command":"unsubscribe","user":"alice","channel":"#room"}', '{"x":1}'):
        redis_server.command("PUBLISH", "fastfan:!commands", junk)
    assert quiet(alice)
    assert alive(alice)
    redis_server.command("PUBLISH", "fastfan:!commands",
                         json.dumps({"command": "disconnect", "user": "alice"}))
    closed_by_api(alice)
    assert server.process.poll() is None
