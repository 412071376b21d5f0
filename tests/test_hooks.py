"""The application's hooks in Python (`fastfan run --app`, issue 32), with the application of
tests/apps/chat.py: each hook's answers, each of its faults, with one worker, two workers
and two nodes on Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.api import call as api_call
from support.api import start_api
from support.cli import assert_usage_error, fastfan
from support.messages import ask, assert_delivered_but_not_kept
from support.redis import RedisServer
from support.server import SECRET, Server, token
from support.waiting import collect, wait_for
from support.wire import HandshakeRefusedError, RawClient
from support.workers import worker_of

TESTS = Path(__file__).parent
APP = ("--app", "apps.chat:app", "--hook-timeout", "0.5")
ON_PATH = {"PYTHONPATH": str(TESTS)}


def join(server: Server, user: str, *, path: str = "/", **headers: str) -> RawClient:
    """A client the chat app lets in as `user`, past what it gets on connect: `welcome`,
    then the `subscribed` of its inbox (authenticate's channels; it waits for the bus to
    have the subscription) and on_connect's hello, in either order."""
    client = RawClient(server.host, server.port, f"{path}?user={user}", headers=headers)
    welcome = client.recv_json()
    assert welcome["type"] == "welcome" and welcome["data"]["user"] == user
    then = [client.recv_json(), client.recv_json()]
    assert [(m["type"], m["channel"]) for m in then if m["type"] == "subscribed"] == [
        ("subscribed", f"inbox.{user}")]
    assert [m["data"] for m in then if m["type"] == "message"] == [{"hello": user}]
    return client


def call(client: RawClient, method: str, data: Any = None) -> Any:
    reply = ask(client, {"type": "rpc", "method": method, "data": data})
    assert reply["type"] == "rpc_result", reply
    return reply["data"]


def refusal(server: Server, query: str, **headers: str) -> tuple[int, str]:
    with pytest.raises(HandshakeRefusedError) as refused:
        RawClient(server.host, server.port, f"/?{query}", headers=headers)
    return refused.value.status, refused.value.body.decode()


class Deployment:
    """One worker, two workers, or two nodes on one Redis: `apart` gives two clients held
    by different workers (or nodes), so what one does must cross to the other."""

    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers

    @property
    def first(self) -> Server:
        return self.servers[0]

    def apart(self, one: str, other: str) -> tuple[RawClient, RawClient]:
        first = join(self.servers[0], one)
        if len(self.servers) > 1:
            return first, join(self.servers[1], other)
        workers = self.first.workers()
        if len(workers) == 1:
            return first, join(self.first, other)
        held = worker_of(self.first, first)
        for _ in range(100):
            second = join(self.first, other)
            if worker_of(self.first, second) != held:
                return first, second
            second.close()
        raise AssertionError("the kernel never put the second client on the other worker")


@pytest.fixture(params=["one worker", "two workers", "two nodes on Redis"])
def deployment(request: pytest.FixtureRequest, start_server: Any) -> Iterator[Deployment]:
    if request.param == "one worker":
        yield Deployment([start_server(*APP, env=ON_PATH)])
    elif request.param == "two workers":
        server = start_server(*APP, "--workers", "2", env=ON_PATH)
        server.wait_ready()
        yield Deployment([server])
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        nodes = [start_server(*APP, "--redis", redis.url, env=ON_PATH) for _ in range(2)]
        for node in nodes:
            node.wait_ready()
        yield Deployment(nodes)


@pytest.fixture
def chat(start_server: Any) -> Server:
    """One worker with the chat app, and a token key (tokens are checked before it)."""
    return start_server(*APP, env=ON_PATH)


# Start-up ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("app", "reason"), [
    ("apps.broken:app", "does not import: ImportError: this application needs a database"),
    ("apps.not_an_app:app", "has a object named app, not a fastfan.App"),
    ("apps.chat:nothing", "has nothing named nothing, not a fastfan.App"),
    ("apps.nowhere:app", "module apps.nowhere does not import"),
    ("apps.chat", "expected package.module:attribute"),
])
def test_an_app_that_does_not_load_is_a_usage_error_before_any_worker(app: str,
                                                                      reason: str) -> None:
    result = fastfan("run", "--insecure", "--app", app, env=ON_PATH)
    assert_usage_error(result, f"--app {app}: ", reason)


def test_an_app_with_authenticate_needs_no_token_key(start_server: Any) -> None:
    server = start_server(*APP, secret=None, env=ON_PATH)
    join(server, "alice").close()


# authenticate ------------------------------------------------------------------------------

def test_authenticate_names_the_user_its_info_and_channels_subscribed_before_welcome(
        deployment: Deployment) -> None:
    alice, bob = deployment.apart("alice", "bob")
    assert call(alice, "whoami")["info"] == {"name": "Alice", "agent": None,
                                              "host": "127.0.0.1"}
    bob.publish("inbox.alice", "psst")  # inbox.alice: subscribed server-side
    assert alice.recv_json()["data"] == "psst"
    for client in (alice, bob):
        client.subscribe("room")
    presence = wait_for(lambda: (p := ask(bob, {"type": "presence", "channel": "room"}))
                        ["data"]["count"] == 2 and p)
    infos = {c["user"]: c["info"]["name"] for c in presence["data"]["clients"]}
    assert infos == {"alice": "Alice", "bob": "Bob"}


def test_authenticates_patterns_replace_the_tokens_but_not_for_its_own_channels(
        chat: Server) -> None:
    """The Identity's `subscribe` leaves out every inbox: the client's own subscribe to one
    is refused, the one authenticate named is subscribed all the same."""
    alice = join(chat, "alice")  # inbox.alice: subscribed
    assert ask(alice, {"type": "subscribe", "channel": "inbox.bob"})["code"] == 403


def test_authenticate_sees_the_request_and_may_answer_later(chat: Server) -> None:
    later = join(chat, "later-one", **{"User-Agent": "tests/1"})
    assert call(later, "whoami")["info"]["agent"] == "tests/1"


def test_a_refusal_is_its_http_status_before_the_upgrade(chat: Server) -> None:
    assert refusal(chat, "user=banned") == (403, "403 Forbidden: banned from this chat\n")
    status, body = refusal(chat, "nobody=1")
    assert (status, body) == (401, "401 Unauthorized: say who you are: ?user=NAME\n")
    # a code that is no HTTP error status is a 403
    assert refusal(chat, "user=teapot")[0] == 403


@pytest.mark.parametrize(("user", "status", "cause"), [
    ("crash", 500, "exception"), ("bad", 500, "bad_return"), ("slow", 504, "timeout")])
def test_a_faulty_authenticate_is_a_5xx_counted_by_cause(chat: Server, user: str, status: int,
                                                         cause: str) -> None:
    assert refusal(chat, f"user={user}")[0] == status
    series = f'fastfan_hook_errors_total{{hook="authenticate",cause="{cause}"}}'
    assert chat.metrics()[series] == 1
    join(chat, "alice").close()  # the server goes on


def test_with_a_token_key_a_bad_token_is_a_401_before_the_hook(chat: Server) -> None:
    status, body = refusal(chat, f"user=alice&token={token('alice', secret='x' * 40)}")
    assert status == 401 and "signature" in body


def test_a_valid_token_reaches_authenticate_as_claims(chat: Server) -> None:
    client = RawClient(chat.host, chat.port, "/ws",
                       headers={"Authorization": f"Bearer {token('carol')}"})
    assert client.recv_json()["data"]["user"] == "carol"
    client.recv_json()  # on_connect's hello (no server-side channels for a token)
    assert call(client, "whoami")["info"] == {"via": "token", "path": "/ws"}


def test_without_a_token_key_authenticate_decides_alone(start_server: Any) -> None:
    server = start_server(*APP, secret=None, env=ON_PATH)
    assert refusal(server, "user=banned")[0] == 403
    assert refusal(server, f"token={token('alice', secret=SECRET)}")[0] == 401  # no claims


# can_subscribe -----------------------------------------------------------------------------

def test_can_subscribe_allows_or_refuses_with_its_code(deployment: Deployment) -> None:
    alice, boss = deployment.apart("alice", "boss")
    assert ask(alice, {"type": "subscribe", "channel": "secret.plans"}) == {
        "type": "error", "code": 403, "message": "members only", "id": 7}
    assert ask(boss, {"type": "subscribe", "channel": "secret.plans"})["type"] == "subscribed"
    wait_for(lambda: ask(alice, {"type": "presence_stats", "channel": "secret.plans"})
             ["data"]["count"] == 1)  # boss's subscription is in place everywhere
    alice.publish("secret.plans", "hello boss")
    assert boss.recv_json()["data"] == "hello boss"


@pytest.mark.parametrize(("channel", "code", "cause"), [
    ("crash.a", 500, "exception"), ("bad.a", 500, "bad_return"), ("slow.a", 504, "timeout")])
def test_a_faulty_can_subscribe_answers_5xx_and_the_connection_stays(
        chat: Server, channel: str, code: int, cause: str) -> None:
    client = join(chat, "alice")
    reply = ask(client, {"type": "subscribe", "channel": channel})
    assert (reply["type"], reply["code"]) == ("error", code)
    assert reply["message"] == ("internal error" if code == 500 else "can_subscribe timed out")
    assert ask(client, {"type": "ping"}) == {"type": "pong", "id": 7}
    series = f'fastfan_hook_errors_total{{hook="can_subscribe",cause="{cause}"}}'
    assert chat.metrics()[series] == 1


def test_one_line_per_fault_and_the_traceback_once(chat: Server) -> None:
    client = join(chat, "alice")
    for _ in range(3):
        assert ask(client, {"type": "subscribe", "channel": "crash.a"})["code"] == 500
    log = chat.log()
    assert log.count("hook can_subscribe failed (exception): KeyError: 'crash.a'") == 3
    assert log.count("Traceback") == 1


def test_a_connections_requests_keep_their_order_behind_a_hook_that_waits(
        chat: Server) -> None:
    client = join(chat, "alice")
    client.send_json_burst([
        {"type": "subscribe", "channel": "wait.a", "id": 1},  # can_subscribe sleeps 0.3 s
        {"type": "publish", "channel": "wait.a", "data": "first", "id": 2},
        {"type": "ping", "id": 3}])
    replies = [client.recv_json() for _ in range(4)]
    assert [(r["type"], r.get("id")) for r in replies] == [
        ("subscribed", 1), ("message", None), ("published", 2), ("pong", 3)]


# can_publish -------------------------------------------------------------------------------

def test_can_publish_rewrites_the_data_everywhere(deployment: Deployment) -> None:
    alice, bob = deployment.apart("alice", "bob")
    bob.subscribe("orders.tea")
    wait_for(lambda: ask(alice, {"type": "presence_stats", "channel": "orders.tea"})
             ["data"]["count"] == 1)
    alice.publish("orders.tea", {"item": "oolong"})
    assert bob.recv_json()["data"] == {"item": "oolong", "by": "alice"}


def test_a_hook_error_is_shaped_by_its_errors_handler(chat: Server) -> None:
    client = join(chat, "alice")
    assert ask(client, {"type": "publish", "channel": "orders.tea", "data": [1]}) == {
        "type": "error", "code": 422, "message": "invalid: an order needs 'item'",
        "field": "data", "id": 7}
    # a HookError without a handler: its own code and message
    assert ask(client, {"type": "publish", "channel": "long.a", "data": "x" * 20}) == {
        "type": "error", "code": 413, "message": "at most 10 characters", "id": 7}


@pytest.mark.parametrize(("channel", "code", "cause"), [
    ("crash.a", 500, "exception"), ("bad.a", 500, "bad_return"), ("slow.a", 504, "timeout")])
def test_a_faulty_can_publish_publishes_nothing(chat: Server, channel: str, code: int,
                                                cause: str) -> None:
    watcher = join(chat, "watcher")
    watcher.subscribe(channel)
    client = join(chat, "alice")
    assert ask(client, {"type": "publish", "channel": channel, "data": 1})["code"] == code
    assert ask(client, {"type": "ping"})["type"] == "pong"
    assert collect(watcher, quiet=0.3) == []
    series = f'fastfan_hook_errors_total{{hook="can_publish",cause="{cause}"}}'
    assert chat.metrics()[series] == 1


@pytest.mark.parametrize("bus", ["one worker", "two nodes on Redis"])
def test_publish_history_false_delivers_a_message_but_keeps_it_out_of_history(
        start_server: Any, request: pytest.FixtureRequest, bus: str) -> None:
    options = (*APP, "--history-size", "10")
    if bus == "one worker":
        servers = [start_server(*options, env=ON_PATH)]
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        servers = [start_server(*options, "--redis", redis.url, env=ON_PATH) for _ in range(2)]
        for server in servers:
            server.wait_ready()
    alice, bob = join(servers[0], "alice"), join(servers[-1], "bob")
    assert_delivered_but_not_kept(alice, bob, "quiet.a", "unkept")


def test_a_slow_hook_for_one_user_delays_that_user_only(start_server: Any) -> None:
    """sloth's publishes wait in can_publish until alice releases them; alice's own go
    through meanwhile."""
    server = start_server("--app", "apps.chat:app", "--hook-timeout", "30", env=ON_PATH)
    sloth, alice = join(server, "sloth"), join(server, "alice")
    listener = join(server, "listener")
    listener.subscribe("room")
    # far more than wait behind a hook before the server stops reading (hooks.MAX_WAITING),
    # and in more than one read: then it reads on as they are handled
    pad = "." * 100
    sent = [f"sloth {n} {pad}" for n in range(1500)]
    sloth.send_json_burst([{"type": "publish", "channel": "room", "data": data}
                           for data in sent])
    for n in range(20):
        alice.publish("room", f"alice {n}")
        assert listener.recv_json()["data"] == f"alice {n}"
    call(alice, "release")
    assert [listener.recv_json()["data"] for _ in sent] == sent


# rpc ---------------------------------------------------------------------------------------

def test_rpc_answers_with_the_methods_result(deployment: Deployment) -> None:
    alice, _ = deployment.apart("alice", "bob")
    assert ask(alice, {"type": "rpc", "method": "add", "data": {"a": 2, "b": 3}}) == {
        "type": "rpc_result", "id": 7, "data": 5}
    alice.send_json({"type": "rpc", "method": "add", "data": {"a": 1, "b": 1}})  # no id
    assert alice.recv_json() == {"type": "rpc_result", "data": 2}
    assert ask(alice, {"type": "rpc", "method": "nope"}) == {
        "type": "error", "code": 404, "message": "unknown method 'nope'", "id": 7}
    reply = ask(alice, {"type": "rpc", "method": "add", "data": {"a": 1}})
    assert (reply["code"], reply["message"]) == (500, "internal error")


def test_a_hook_that_is_not_async_is_a_fault_said_in_the_log(chat: Server) -> None:
    client = join(chat, "alice")
    reply = ask(client, {"type": "rpc", "method": "plain"})
    assert (reply["code"], reply["message"]) == (500, "internal error")
    assert "hook rpc failed (exception): TypeError: a hook must be async (async def): " \
           "it returned str, not a coroutine" in chat.log()


def test_rpc_without_an_app_is_an_unknown_method(server: Server) -> None:
    client = server.connect()
    assert ask(client, {"type": "rpc", "method": "add"}) == {
        "type": "error", "code": 404, "message": "unknown method 'add'", "id": 7}


def test_an_rpc_that_takes_too_long_is_a_504(chat: Server) -> None:
    client = join(chat, "alice")
    assert ask(client, {"type": "rpc", "method": "sleep", "data": 5}) == {
        "type": "error", "code": 504, "message": "rpc timed out", "id": 7}
    assert call(client, "sleep", 0.01) == "awake"


# The connection ----------------------------------------------------------------------------

def test_connection_send_reaches_that_connection_alone(chat: Server) -> None:
    alice, bob = join(chat, "alice"), join(chat, "bob")
    alice.send_json({"type": "rpc", "method": "send", "data": {"note": 1}, "id": 1})
    sent = alice.recv_json()
    assert {k: sent[k] for k in ("type", "channel", "data", "from")} == {
        "type": "message", "channel": None, "data": {"note": 1}, "from": "server"}
    assert alice.recv_json() == {"type": "rpc_result", "id": 1, "data": "sent"}
    assert collect(bob, quiet=0.3) == []


def test_connection_close_closes_it_with_its_code_and_on_disconnect_hears(
        deployment: Deployment) -> None:
    alice, watcher = deployment.apart("alice", "watcher")
    watcher.subscribe("audit")
    wait_for(lambda: ask(alice, {"type": "presence_stats", "channel": "audit"})
             ["data"]["count"] == 1)
    alice.send_json({"type": "rpc", "method": "close"})
    assert alice.recv_close() == (4100, "bye")
    # Answered, as a client does: else the server hangs up only after its 5 s wait for
    # the answer, and on_disconnect's publish raced the watcher's 5 s of patience.
    alice.send_frame(0x8, (4100).to_bytes(2, "big"))
    assert watcher.recv_json()["data"] == {"left": "alice", "code": 4100, "reason": "bye"}


def test_on_disconnect_gets_the_clients_close_code(chat: Server) -> None:
    watcher = join(chat, "watcher")
    watcher.subscribe("audit")
    alice = join(chat, "alice")
    alice.send_frame(0x8, (4321).to_bytes(2, "big") + b"gone fishing")
    message = watcher.recv_json()
    assert message["data"] == {"left": "alice", "code": 4321, "reason": "gone fishing"}
    assert message["from"] == "server"


def test_metadata_shows_in_presence_beside_info(deployment: Deployment) -> None:
    alice, bob = deployment.apart("alice", "bob")
    for client in (alice, bob):
        client.subscribe("room")
    assert call(alice, "metadata", {"status": "away"}) == {"status": "away"}
    started = time.monotonic()

    def clients() -> dict[str, Any]:
        answer = ask(bob, {"type": "presence", "channel": "room"})["data"]["clients"]
        return {c["user"]: c for c in answer}

    wait_for(lambda: clients().get("alice", {}).get("metadata") == {"status": "away"})
    assert time.monotonic() - started < 1.0
    assert "metadata" not in clients()["bob"]  # omitted when empty
    assert clients()["alice"]["info"]["name"] == "Alice"


def test_heartbeat_in_stats_and_on_the_connection(chat: Server) -> None:
    client = join(chat, "alice")
    before = int(time.time() * 1000)
    heartbeat = ask(client, {"type": "stats"})["data"]["heartbeat"]
    assert heartbeat["unanswered"] == 0 and heartbeat["alive"] is True
    assert abs(heartbeat["lastSeen"] - before) < 1000
    assert call(client, "heartbeat")["alive"] is True


def test_app_publish_reaches_every_subscriber_from_the_server(deployment: Deployment) -> None:
    alice, bob = deployment.apart("alice", "bob")
    bob.subscribe("news")
    wait_for(lambda: ask(alice, {"type": "presence_stats", "channel": "news"})
             ["data"]["count"] == 1)
    assert call(alice, "publish", {"channel": "news", "data": {"headline": 1}}) == {}
    message = bob.recv_json()
    assert (message["data"], message["from"]) == ({"headline": 1}, "server")


def test_app_publish_on_a_history_channel_gives_the_position(start_server: Any) -> None:
    server = start_server(*APP, "--history-size", "10", env=ON_PATH)
    client = join(server, "alice")
    first = call(client, "publish", {"channel": "news", "data": 1})
    second = call(client, "publish", {"channel": "news", "data": 2})
    assert (first["offset"], second["offset"]) == (1, 2) and first["epoch"] == second["epoch"]


# on_message ---------------------------------------------------------------------------------

def test_on_message_runs_once_per_node_for_every_message_whoever_published_it(
        deployment: Deployment) -> None:
    alice, watcher = deployment.apart("alice", "watcher")
    watcher.subscribe("receipts")
    nodes = len(deployment.servers)
    wait_for(lambda: ask(alice, {"type": "presence_stats", "channel": "receipts"})
             ["data"]["count"] == 1)
    alice.publish("orders.tea", {"item": "sencha"})  # nobody subscribes to orders.tea
    call(alice, "publish", {"channel": "orders.cake", "data": {"item": "scone"}})
    receipts = [watcher.recv_json()["data"] for _ in range(2 * nodes)]
    assert collect(watcher, quiet=0.5) == []
    assert sorted((r["channel"], r["from"]) for r in receipts) == sorted(
        [("orders.cake", "server"), ("orders.tea", alice_id(alice))] * nodes)
    assert {"item": "sencha", "by": "alice"} in [r["order"] for r in receipts]


def alice_id(client: RawClient) -> str:
    client_id: str = call(client, "whoami")["clientId"]
    return client_id


def test_on_message_hears_a_bare_redis_publish(start_server: Any,
                                               redis_server: RedisServer) -> None:
    node = start_server(*APP, "--redis", redis_server.url, env=ON_PATH)
    node.wait_ready()
    watcher = join(node, "watcher")
    watcher.subscribe("receipts")
    redis_server.command("PUBLISH", "fastfan:orders.x",
                         '{"type":"message","channel":"orders.x","data":{"item":"bare"},'
                         '"from":"backend","timestamp":1}')
    assert watcher.recv_json()["data"] == {"channel": "orders.x", "order": {"item": "bare"},
                                           "from": "backend", "offset": None}


def test_on_message_sees_the_offset_on_a_history_channel(start_server: Any) -> None:
    server = start_server(*APP, "--history-size", "10", "--history-channels", "orders.*",
                          "--workers", "2", env=ON_PATH)
    server.wait_ready()
    watcher = join(server, "watcher")
    watcher.subscribe("receipts")
    watcher.send_json_burst([{"type": "rpc", "method": "publish",
                              "data": {"channel": "orders.x", "data": {"item": n}}}
                             for n in range(3)])
    offsets = []
    while len(offsets) < 3:
        if (message := watcher.recv_json()).get("channel") == "receipts":
            offsets.append(message["data"]["offset"])
    assert sorted(offsets) == [1, 2, 3]


# refresh -----------------------------------------------------------------------------------

def test_an_expiring_connection_is_refreshed_by_the_app_or_closed(chat: Server) -> None:
    renewed, expiring = join(chat, "renewed"), join(chat, "expiring")
    assert expiring.recv_close() == (4001, "token expired")
    assert ask(renewed, {"type": "ping"})["type"] == "pong"  # past its first expiry
    assert call(renewed, "metadata", {}) == {"renewed": True}


def test_run_logs_the_apps_hooks_at_start(chat: Server) -> None:
    assert "hooks: --app apps.chat:app (authenticate, can_subscribe, can_publish, refresh, " \
           "on_connect, on_disconnect, rpc whoami," in chat.log()


def test_on_message_hears_the_server_apis_publish(start_server: Any) -> None:
    server, api_port = start_api(start_server, *APP, env=ON_PATH)
    watcher = join(server, "watcher")
    watcher.subscribe("receipts")
    assert api_call(api_port, "publish", {"channel": "orders.api", "data": {"item": 1}}) == (
        200, {"result": {}})
    assert watcher.recv_json()["data"] == {"channel": "orders.api", "order": {"item": 1},
                                           "from": "api", "offset": None}
