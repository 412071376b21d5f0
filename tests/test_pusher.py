"""Pusher's protocol with Pusher's own libraries, unchanged: pusher-js 8 in Node as the
client, the `pusher` server library for Node and for Python as the backend (triggers,
channel queries, the signatures of authorizeChannel), on one worker and on two."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pusher
import pytest
from browser import CHROMIUM, FIREFOX, Browser, Firefox
from support.api import call, start_api
from support.patched import BROWSER_HEADERS
from support.redis import RedisServer
from support.server import Server, kill_and_restart, worker_rss_kib
from support.waiting import wait_for
from support.wire import HandshakeRefusedError, RawClient

JS = Path(__file__).parent / "js"
APP_ID, KEY, SECRET = "1", "app-key", "app-secret"
APP = f"{APP_ID}:{KEY}:{SECRET}"


class PusherJs:
    """pusher-js in Node (tests/js/pusher_client.js, or Laravel Echo on it:
    echo_client.mjs): commands in, events out."""

    def __init__(self, server: Server, user: str = "u1", secret: str = SECRET,
                 script: str = "pusher_client.js") -> None:
        self.process = subprocess.Popen(
            ["node", str(JS / script), server.host, str(server.port), APP_ID, KEY,
             secret, user], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.socket_id: str = self.wait(event="connected")["socket_id"]

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.events.append(json.loads(line))

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def seen(self, **fields: Any) -> list[dict[str, Any]]:
        return [event for event in list(self.events)
                if all(event.get(name) == value for name, value in fields.items())]

    def wait(self, **fields: Any) -> dict[str, Any]:
        return wait_for(lambda: next(iter(self.seen(**fields)), None))

    def subscribe(self, channel: str) -> dict[str, Any]:
        self.send(op="subscribe", channel=channel)
        return wait_for(lambda: next(iter(self.seen(event="subscribed", channel=channel)
                                          + self.seen(event="subscription_error",
                                                      channel=channel)), None))

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def pusher_js() -> Any:
    """pusher_js(server, user=...) -> a connected PusherJs, killed at the end."""
    started: list[PusherJs] = []

    def start(server: Server, user: str = "u1", secret: str = SECRET,
              script: str = "pusher_client.js") -> PusherJs:
        started.append(PusherJs(server, user, secret, script))
        return started[-1]

    yield start
    for client in started:
        client.close()


def node_backend(server: Server, **command: Any) -> dict[str, Any]:
    """One call of the `pusher` Node library (tests/js/pusher_server.js): status and body."""
    result = subprocess.run(
        ["node", str(JS / "pusher_server.js"), server.host, str(server.port), APP_ID, KEY,
         SECRET, json.dumps(command)], capture_output=True, text=True, timeout=30, check=True)
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def python_backend(server: Server, secret: str = SECRET) -> Any:
    return pusher.Pusher(app_id=APP_ID, key=KEY, secret=secret, host=server.host,
                         port=server.port, ssl=False)


class RawPusher:
    """A Pusher connection spoken by hand, for tests that move many in step (no Node)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.client = RawClient(server.host, server.port,
                                f"/app/{KEY}?protocol=7&client=js&version=8.4.0")
        self.events: list[dict[str, Any]] = []  # every one read, `data` decoded
        self.socket_id: str = self.next("pusher:connection_established")["data"]["socket_id"]

    def worker(self) -> str:
        """Its worker's number (a socket id begins with it)."""
        return self.socket_id.split(".")[0]

    def subscribe(self, channel: str, user: str | None = None) -> None:
        """Sends the subscribe (signed, with `user` as the member on a presence channel);
        reads nothing."""
        data: dict[str, Any] = {"channel": channel}
        if channel.startswith(("private-", "presence-")):
            member = None if user is None else {"user_id": user, "user_info": {"n": user}}
            data.update(python_backend(self.server).authenticate(channel, self.socket_id,
                                                                 member))
        self.client.send_json({"event": "pusher:subscribe", "data": data})

    def unsubscribe(self, channel: str) -> None:
        self.client.send_json({"event": "pusher:unsubscribe", "data": {"channel": channel}})

    def next(self, event: str, **fields: Any) -> dict[str, Any]:
        """Reads until an event named `event` (whose `data` has `fields`) comes."""
        while True:
            got = self.client.recv_json()
            if isinstance(got.get("data"), str) and got["data"].startswith("{"):
                got["data"] = json.loads(got["data"])
            self.events.append(got)
            if got["event"] == event and all(got["data"].get(name) == value
                                             for name, value in fields.items()):
                return got

    def seen(self, event: str) -> list[Any]:
        return [got["data"] for got in self.events if got["event"] == event]


def on_two_workers(server: Server) -> tuple[RawPusher, RawPusher]:
    """Two connections, each on its own worker of `server`'s two."""
    first = RawPusher(server)
    while (second := RawPusher(server)).worker() == first.worker():
        second.client.close()
    return first, second


def start_pusher(start_server: Any, *args: str) -> Server:
    """A server with one Pusher app and no token key: --pusher-app alone is enough."""
    server: Server = start_server("--pusher-app", APP, *args, secret=None)
    return server


def test_pusher_js_subscribes_and_receives_what_both_libraries_trigger(
        start_server: Any, pusher_js: Any) -> None:
    server = start_pusher(start_server)
    client = pusher_js(server, "u1")
    for channel in ("news", "private-orders", "private-encrypted-x", "presence-room"):
        assert client.subscribe(channel)["event"] == "subscribed"
    assert client.seen(event="subscribed", channel="presence-room")[0]["members"] == ["u1"]

    answer = node_backend(server, op="trigger", channels=["news", "private-orders"],
                          name="created", data={"id": 1})
    assert answer == {"status": 200, "body": {}}
    python_backend(server).trigger(["presence-room"], "moved", {"to": "b"})
    node_backend(server, op="triggerBatch", batch=[
        {"channel": "news", "name": "batched", "data": "plain text"}])

    assert client.wait(event="message", channel="news", name="created")["data"] == {"id": 1}
    assert client.wait(event="message", channel="private-orders",
                       name="created")["data"] == {"id": 1}
    assert client.wait(event="message", channel="presence-room",
                       name="moved")["data"] == {"to": "b"}
    assert client.wait(event="message", channel="news", name="batched")["data"] == "plain text"
    node_backend(server, op="trigger", channels=["private-encrypted-x"], name="secret",
                 data={"pin": 1234})  # encrypted by the library, decrypted by pusher-js
    assert client.wait(event="message", channel="private-encrypted-x",
                       name="secret")["data"] == {"pin": 1234}


def test_a_bad_signature_is_a_subscription_error_and_the_connection_stays(
        start_server: Any, pusher_js: Any) -> None:
    server = start_pusher(start_server)
    forger = pusher_js(server, "u1", secret="not-the-app-secret")
    assert forger.subscribe("private-orders") == {
        "event": "subscription_error", "channel": "private-orders", "status": 401}
    assert forger.subscribe("presence-room")["event"] == "subscription_error"
    assert forger.subscribe("news")["event"] == "subscribed"
    python_backend(server).trigger(["news", "private-orders"], "created", {"id": 2})
    forger.wait(event="message", channel="news", name="created")
    assert not forger.seen(channel="private-orders", event="message")
    assert not forger.seen(event="state", state="disconnected")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_members_are_added_and_removed_once_per_user(
        start_server: Any, pusher_js: Any, workers: str) -> None:
    server = start_pusher(start_server, "--workers", workers)
    backend = python_backend(server)
    alice = pusher_js(server, "alice")
    assert alice.subscribe("presence-room")["members"] == ["alice"]
    bob = pusher_js(server, "bob")
    assert bob.subscribe("presence-room")["members"] == ["alice", "bob"]
    assert alice.wait(event="member_added", id="bob")["info"] == {"name": "user bob"}
    bob_again = pusher_js(server, "bob")  # a second tab: bob is there already
    assert bob_again.subscribe("presence-room")["members"] == ["alice", "bob"]
    # (a worker's presence answer serves for half a second: what it says may be that old)
    wait_for(lambda: sorted(user["id"] for user in backend.users_info(
        "presence-room")["users"]) == ["alice", "bob"])
    wait_for(lambda: backend.channel_info("presence-room", [
        "user_count", "subscription_count"]) == {
        "occupied": True, "user_count": 2, "subscription_count": 3})

    bob.send(op="unsubscribe", channel="presence-room")  # bob's other tab stays
    wait_for(lambda: backend.channel_info(
        "presence-room", ["subscription_count"])["subscription_count"] == 2)
    bob_again.close()  # the last of bob's connections
    alice.wait(event="member_removed", id="bob")
    backend.trigger(["presence-room"], "marker", {})
    alice.wait(event="message", name="marker")
    assert len(alice.seen(event="member_added", id="bob")) == 1
    assert len(alice.seen(event="member_removed", id="bob")) == 1
    assert not alice.seen(event="member_added", id="alice")


@pytest.mark.parametrize("deployment", ["two workers", "two nodes on redis"])
def test_one_user_joining_and_leaving_twice_at_once_is_one_added_and_one_removed(
        start_server: Any, redis_server: RedisServer, deployment: str) -> None:
    """Two connections of one user join a presence channel at the same instant on two
    workers (or nodes), then leave at the same instant, again and again: the others hear
    exactly one member_added and one member_removed each time, and the user's own
    connections never hear of their own user."""
    if deployment == "two workers":
        server = start_pusher(start_server, "--workers", "2")
        server.wait_ready()
        twins = on_two_workers(server)
    else:
        nodes = [start_pusher(start_server, "--redis", redis_server.url) for _ in range(2)]
        for node in nodes:
            node.wait_ready()
        twins = (RawPusher(nodes[0]), RawPusher(nodes[1]))
        server = nodes[0]
    watcher = RawPusher(server)
    watcher.subscribe("presence-room", "watcher")
    watcher.next("pusher_internal:subscription_succeeded")
    cycles = 8
    for cycle in range(1, cycles + 1):
        for twin in twins:
            twin.subscribe("presence-room", "twin")
        for twin in twins:
            assert "twin" in twin.next("pusher_internal:subscription_succeeded")[
                "data"]["presence"]["ids"]
        added = watcher.next("pusher_internal:member_added", user_id="twin")
        assert added["data"]["user_info"] == {"n": "twin"}
        for twin in twins:
            twin.unsubscribe("presence-room")
        watcher.next("pusher_internal:member_removed", user_id="twin")
        assert len(watcher.seen("pusher_internal:member_added")) == cycle
    python_backend(server).trigger(["presence-room"], "marker", {})
    watcher.next("marker")
    assert [got["event"] for got in watcher.events
            if got["event"].startswith("pusher_internal:member")] == [
        "pusher_internal:member_added", "pusher_internal:member_removed"] * cycles
    for twin in twins:  # (what came after each one's last read comes before the marker)
        twin.subscribe("presence-room", "twin")
        twin.next("pusher_internal:subscription_succeeded")
    python_backend(server).trigger(["presence-room"], "marker", {})
    for twin in twins:
        twin.next("marker")
        assert not [got for got in twin.events if got["event"].startswith(
            "pusher_internal:member") and got["data"]["user_id"] == "twin"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_client_events_reach_the_others_never_the_sender(
        start_server: Any, pusher_js: Any, workers: str) -> None:
    server = start_pusher(start_server, "--workers", workers)
    clients = [pusher_js(server, f"u{i}") for i in range(3)]
    if workers == "2":  # socket ids begin with their worker's number
        while len({client.socket_id.split(".")[0] for client in clients}) < 2:
            clients.append(pusher_js(server, f"u{len(clients)}"))
    for client in clients:
        assert client.subscribe("private-chat")["event"] == "subscribed"
        assert client.subscribe("presence-chat")["event"] == "subscribed"
    sender, *others = clients
    sender.send(op="trigger", channel="private-chat", name="client-typing", data={"on": 1})
    sender.send(op="trigger", channel="presence-chat", name="client-typing", data={"on": 2})
    for other in others:
        assert other.wait(event="message", channel="private-chat",
                          name="client-typing")["data"] == {"on": 1}
        other.wait(event="message", channel="presence-chat", name="client-typing")
    python_backend(server).trigger(["private-chat"], "marker", {})
    sender.wait(event="message", name="marker")
    assert not sender.seen(event="message", name="client-typing")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_socket_id_leaves_the_sender_out(start_server: Any, pusher_js: Any,
                                         workers: str) -> None:
    server = start_pusher(start_server, "--workers", workers)
    clients = [pusher_js(server, "u1"), pusher_js(server, "u2")]
    if workers == "2":  # socket ids begin with their worker's number
        while len({client.socket_id.split(".")[0] for client in clients}) < 2:
            clients.append(pusher_js(server, f"u{len(clients)}"))
    for client in clients:
        client.subscribe("news")
    sender, *others = clients
    for _ in range(4):  # each API request lands on a worker the kernel picks
        node_backend(server, op="trigger", channels=["news"], name="saved", data={},
                     socket_id=sender.socket_id)
        python_backend(server).trigger(["news"], "saved-too", {}, socket_id=sender.socket_id)
    python_backend(server).trigger(["news"], "marker", {})
    for other in others:
        wait_for(lambda other=other: len(other.seen(event="message", name="saved")) == 4
                 and len(other.seen(event="message", name="saved-too")) == 4)
    sender.wait(event="message", name="marker")
    assert [event["name"] for event in sender.seen(event="message")] == ["marker"]


@pytest.fixture
def redis_shards(tmp_path: Path) -> Iterator[str]:
    """Three redis-servers, as --redis takes them: channels sharded over them."""
    servers = [RedisServer(tmp_path / f"redis-{index}.log") for index in range(3)]
    yield ",".join(server.url for server in servers)
    for server in servers:
        server.kill()


def test_socket_id_travels_with_the_event_on_redis_shards(
        start_server: Any, redis_shards: str) -> None:
    """A trigger that leaves out a connection of another node keeps its place among the
    channel's events, and on a cache channel it is the latest event like any other."""
    nodes = [start_pusher(start_server, "--redis", redis_shards) for _ in range(2)]
    for node in nodes:
        node.wait_ready()
    sender, other = RawPusher(nodes[0]), RawPusher(nodes[1])
    for client in (sender, other):
        client.subscribe("cache-news")
        client.next("pusher:cache_miss")  # (after subscription_succeeded)
    backend = python_backend(nodes[1])  # the sender's connection is on the other node
    for n in range(10):
        backend.trigger(["cache-news"], "n", {"n": n},
                        socket_id=sender.socket_id if n % 2 else None)
    other.next("n", n=9)
    assert [data["n"] for data in other.seen("n")] == list(range(10))
    late = RawPusher(nodes[0])
    late.subscribe("cache-news")
    assert late.next("n")["data"] == {"n": 9}
    backend.trigger(["cache-news"], "marker", {})
    sender.next("marker")
    assert [data["n"] for data in sender.seen("n")] == [0, 2, 4, 6, 8]


def test_two_nodes_on_redis_share_channels_members_and_client_events(
        start_server: Any, redis_server: RedisServer, pusher_js: Any) -> None:
    nodes = [start_pusher(start_server, "--redis", redis_server.url, "--workers", workers)
             for workers in ("1", "2")]
    for node in nodes:
        node.wait_ready()
    alice, bob = pusher_js(nodes[0], "alice"), pusher_js(nodes[1], "bob")
    assert alice.subscribe("presence-room")["members"] == ["alice"]
    assert bob.subscribe("presence-room")["members"] == ["alice", "bob"]
    alice.wait(event="member_added", id="bob")
    python_backend(nodes[1]).trigger(["presence-room"], "from-node-1", {"n": 1})
    node_backend(nodes[0], op="trigger", channels=["presence-room"], name="from-node-0",
                 data={"n": 0})
    for client in (alice, bob):
        client.wait(event="message", name="from-node-1")
        client.wait(event="message", name="from-node-0")
    bob.send(op="trigger", channel="presence-room", name="client-wave", data={})
    alice.wait(event="message", name="client-wave")
    wait_for(lambda: python_backend(nodes[0]).channel_info(
        "presence-room", ["user_count"])["user_count"] == 2, timeout=3)
    bob.close()
    alice.wait(event="member_removed", id="bob")
    assert not bob.seen(event="message", name="client-wave")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_signed_in_users_get_what_is_sent_to_them_until_terminated(
        start_server: Any, pusher_js: Any, workers: str) -> None:
    server = start_pusher(start_server, "--workers", workers)
    tabs = [pusher_js(server, "ada"), pusher_js(server, "ada")]
    other = pusher_js(server, "bea")
    for client in (*tabs, other):
        client.send(op="signin")
        client.wait(event="signed_in")
        client.wait(event="user_channel")  # pusher-js subscribes to its user's own channel
    assert node_backend(server, op="sendToUser", user="ada", name="note", data={"n": 1}) == {
        "status": 200, "body": {}}
    python_backend(server).send_to_user("ada", "note", {"n": 2})
    for tab in tabs:
        tab.wait(event="user_message", name="note", data={"n": 2})
        assert tab.seen(event="user_message", name="note", data={"n": 1})

    python_backend(server).terminate_user_connections("ada")  # without /apps/ID
    for tab in tabs:
        tab.wait(event="state", state="disconnected")
    assert node_backend(server, op="terminate", user="bea") == {"status": 200, "body": {}}
    other.wait(event="state", state="disconnected")
    assert not other.seen(event="user_message")


def test_a_forged_signin_is_closed_with_4009(start_server: Any) -> None:
    server = start_pusher(start_server)
    client = RawClient(server.host, server.port, f"/app/{KEY}?protocol=7")
    socket_id = json.loads(client.recv_json()["data"])["socket_id"]
    forged = pusher.Pusher(app_id=APP_ID, key=KEY, secret="wrong").authenticate_user(
        socket_id, {"id": "ada"})
    client.send_json({"event": "pusher:subscribe",
                      "data": {"channel": "#server-to-user-ada"}})
    assert client.recv_json()["event"] == "pusher:subscription_error"  # not signed in
    client.send_json({"event": "pusher:signin", "data": forged})
    assert client.recv_json()["data"]["code"] == 4009
    assert client.recv_close()[0] == 4009


def triggered(backend: Any, channel: str, event: str, data: Any) -> bool:
    """One trigger; False if the server answered 503 (try again)."""
    try:
        backend.trigger([channel], event, data)
    except pusher.errors.PusherBadStatus as exc:
        if "503" not in str(exc):
            raise
        return False
    return True


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cache_channels_give_a_subscriber_the_latest_event_or_a_miss(
        start_server: Any, pusher_js: Any, workers: str) -> None:
    server = start_pusher(start_server, "--workers", workers)
    server.wait_ready()
    backend = python_backend(server)
    # (with two workers, /ready's 200 came from one; the other may not reach the channel's
    # history owner yet and answer 503: a backend tries again)
    wait_for(lambda: triggered(backend, "cache-price", "price", {"eur": 1}))  # nobody yet
    backend.trigger(["cache-price"], "price", {"eur": 2})
    client = pusher_js(server, "u1")
    client.subscribe("cache-price")
    assert client.wait(event="message", channel="cache-price")["data"] == {"eur": 2}
    client.subscribe("cache-nothing-yet")
    client.wait(event="cache_miss", channel="cache-nothing-yet")
    backend.trigger(["cache-price"], "price", {"eur": 3})
    client.wait(event="message", channel="cache-price", data={"eur": 3})
    assert not client.seen(event="cache_miss", channel="cache-price")
    assert [e["data"] for e in client.seen(event="message", channel="cache-price")] == [
        {"eur": 2}, {"eur": 3}]
    plain = pusher_js(server, "u2")
    plain.subscribe("news")
    backend.trigger(["news"], "marker", {})
    plain.wait(event="message", name="marker")
    assert not plain.seen(event="cache_miss")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_cache_channel_gives_each_event_once_and_in_order_while_events_flow(
        start_server: Any, workers: str) -> None:
    """Subscribers arriving while a backend triggers without pause: after
    subscription_succeeded each gets the latest event, then every later one, each once.
    (The latest used to be read after subscription_succeeded: an event triggered between
    came live and then again as the cached one, or an older one came after it.)"""
    server = start_pusher(start_server, "--workers", workers)
    server.wait_ready()
    backend = python_backend(server)
    wait_for(lambda: triggered(backend, "cache-ticks", "tick", {"n": 0}))
    stop = threading.Event()

    def trigger_forever() -> None:
        n = 1
        while not stop.is_set():
            if triggered(backend, "cache-ticks", "tick", {"n": n}):
                n += 1

    publisher = threading.Thread(target=trigger_forever, daemon=True)
    publisher.start()
    try:
        for _ in range(12):
            client = RawPusher(server)
            client.subscribe("cache-ticks")
            assert client.client.recv_json()["event"] == "pusher_internal:subscription_succeeded"
            ticks = []
            while len(ticks) < 8:
                event = client.client.recv_json()
                assert event["event"] == "tick", event  # the latest is never a miss here
                ticks.append(json.loads(event["data"])["n"])
            assert ticks == list(range(ticks[0], ticks[0] + 8)), ticks
            client.client.close()
    finally:
        stop.set()
        publisher.join(10)


def test_pusher_and_fastfan_clients_share_a_channel_through_the_mapping(
        start_server: Any, pusher_js: Any) -> None:
    """Pusher channel C of app ID is fastfan channel pusher.ID.C: fastfan's server API
    publishes to it as a Pusher event, and a fastfan client subscribed to it receives the
    Pusher frames."""
    server, api_port = start_api(start_server, "--pusher-app", APP)  # and a token key
    client = pusher_js(server, "u1")
    client.subscribe("news")
    native = server.connect("reader")
    native.send_json({"type": "subscribe", "channel": f"pusher.{APP_ID}.news"})
    assert native.recv_json()["type"] == "subscribed"

    assert call(api_port, "publish", {"channel": f"pusher.{APP_ID}.news",
                                      "data": {"event": "created", "data": {"id": 7}}}) == (
        200, {"result": {}})
    assert client.wait(event="message", name="created")["data"] == {"id": 7}
    assert native.recv_json() == {"event": "created", "channel": "news",
                                  "data": '{"id":7}'}
    python_backend(server).trigger(["news"], "updated", {"id": 7})
    frame = native.recv_json()  # as the library encoded the data
    assert (frame["event"], frame["channel"], json.loads(frame["data"])) == (
        "updated", "news", {"id": 7})
    status, answer = call(api_port, "publish", {"channel": f"pusher.{APP_ID}.news",
                                                "data": {"no": "event"}})
    assert status == 400 and "event" in answer["error"]["message"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_laravel_echo_listens_joins_and_whispers(
        start_server: Any, pusher_js: Any, workers: str) -> None:
    server = start_pusher(start_server, "--workers", workers)
    alice, bob = (pusher_js(server, user, script="echo_client.mjs") for user in ("1", "2"))
    alice.send(op="listen", kind="channel", channel="orders", event="OrderShipped")
    alice.send(op="listen", kind="private", channel="App.Models.User.1", event="Paid")
    alice.wait(event="subscribed", channel="orders")
    alice.wait(event="subscribed", channel="App.Models.User.1")
    alice.send(op="join", channel="chat")
    assert alice.wait(event="here", channel="chat")["users"] == ["1"]
    bob.send(op="join", channel="chat")
    assert bob.wait(event="here", channel="chat")["users"] == ["1", "2"]
    alice.wait(event="joining", id="2")

    backend = python_backend(server)  # as Laravel broadcasts: the event's class name
    backend.trigger(["orders"], "App\\Events\\OrderShipped", {"order": 5})
    backend.trigger(["private-App.Models.User.1"], "App\\Events\\Paid", {"total": 9})
    assert alice.wait(event="heard", name="OrderShipped")["data"] == {"order": 5}
    assert alice.wait(event="heard", name="Paid")["data"] == {"total": 9}

    for client in (alice, bob):
        client.send(op="listenForWhisper", kind="join", channel="chat", name="typing")
    bob.send(op="whisper", kind="join", channel="chat", name="typing", data={"who": "2"})
    assert alice.wait(event="whisper", name="typing")["data"] == {"who": "2"}
    bob.send(op="leave", channel="chat")
    alice.wait(event="leaving", id="2")
    assert not bob.seen(event="whisper")


def test_channel_queries_through_the_libraries(start_server: Any, pusher_js: Any) -> None:
    server = start_pusher(start_server, "--workers", "2")
    for user in ("u1", "u2"):
        client = pusher_js(server, user)
        for channel in ("news", "presence-a", "private-b"):
            client.subscribe(channel)
    backend = python_backend(server)
    assert backend.channels_info() == {"channels": {"news": {}, "presence-a": {},
                                                    "private-b": {}}}
    # (a worker's presence answer serves for half a second: counts may be that old)
    wait_for(lambda: backend.channels_info(prefix_filter="presence-",
                                           attributes=["user_count"]) == {
        "channels": {"presence-a": {"user_count": 2}}})
    answer = node_backend(server, op="get", path="/channels",
                          params={"filter_by_prefix": "private-",
                                  "info": "subscription_count"})
    assert answer == {"status": 200,
                      "body": {"channels": {"private-b": {"subscription_count": 2}}}}
    assert backend.channel_info("gone", ["subscription_count"]) == {
        "occupied": False, "subscription_count": 0}
    with pytest.raises(pusher.errors.PusherBadRequest):
        backend.channel_info("news", ["user_count"])  # presence channels only
    answer = node_backend(server, op="trigger", channels=["news", "gone"], name="e", data={},
                          info="subscription_count")
    assert answer == {"status": 200, "body": {"channels": {
        "news": {"subscription_count": 2}, "gone": {"subscription_count": 0}}}}
    wait_for(lambda: backend.trigger_batch([  # (counts may be half a second old)
        {"channel": "presence-a", "name": "e", "data": {}, "info": "user_count"},
        {"channel": "news", "name": "e", "data": {}}]) == {"batch": [{"user_count": 2}, {}]})


def test_the_http_api_wants_pusher_signatures(start_server: Any) -> None:
    server = start_pusher(start_server)
    with pytest.raises(pusher.errors.PusherBadAuth):
        python_backend(server, secret="wrong").trigger(["news"], "e", {})
    assert server.get(f"/apps/{APP_ID}/channels")[0] == 401  # unsigned


def test_an_unknown_key_upgrades_then_gets_4001(start_server: Any) -> None:
    server = start_pusher(start_server)
    client = RawClient(server.host, server.port, "/app/no-such-key?protocol=7")
    error = client.recv_json()
    assert error["event"] == "pusher:error" and error["data"]["code"] == 4001
    assert client.recv_close()[0] == 4001


@pytest.mark.parametrize(("query", "code"), [
    ("?protocol=6&client=js&version=8.4.0", 4007), ("?protocol=8", 4007),
    ("?protocol=seven", 4006), ("?client=js&version=8.4.0", 4008), ("", 4008)])
def test_a_protocol_other_than_7_gets_pusher_s_error_and_a_close(
        start_server: Any, query: str, code: int) -> None:
    server = start_pusher(start_server)
    client = RawClient(server.host, server.port, f"/app/{KEY}{query}")
    error = client.recv_json()
    assert error["event"] == "pusher:error" and error["data"]["code"] == code
    assert client.recv_close()[0] == code


def test_client_events_on_public_channels_are_refused_and_the_connection_stays(
        start_server: Any) -> None:
    server = start_pusher(start_server)
    client = RawClient(server.host, server.port, f"/app/{KEY}?protocol=7")
    assert client.recv_json()["event"] == "pusher:connection_established"
    client.send_json({"event": "pusher:subscribe", "data": {"channel": "news"}})
    assert client.recv_json() == {"event": "pusher_internal:subscription_succeeded",
                                  "channel": "news", "data": "{}"}
    client.send_json({"event": "client-x", "channel": "news", "data": {}})
    assert client.recv_json()["event"] == "pusher:error"
    client.send_json({"event": "pusher:ping", "data": {}})
    assert client.recv_json()["event"] == "pusher:pong"


def test_client_events_past_the_rate_get_4301(start_server: Any, pusher_js: Any) -> None:
    server = start_pusher(start_server)
    client = RawClient(server.host, server.port, f"/app/{KEY}?protocol=7")
    socket_id = json.loads(client.recv_json()["data"])["socket_id"]
    auth = python_backend(server).authenticate(channel="private-x", socket_id=socket_id)
    client.send_json({"event": "pusher:subscribe",
                      "data": {"channel": "private-x", "auth": auth["auth"]}})
    assert client.recv_json()["event"] == "pusher_internal:subscription_succeeded"
    client.send_json_burst([{"event": "client-x", "channel": "private-x", "data": i}
                            for i in range(50)])
    error = client.recv_json()
    assert error["event"] == "pusher:error" and error["data"]["code"] == 4301


def test_subscribe_churn_is_held_to_the_subscribe_rate(start_server: Any) -> None:
    server = start_pusher(start_server, "--max-subscriptions", "5", "--subscribe-rate", "1")
    client = RawClient(server.host, server.port, f"/app/{KEY}?protocol=7")
    assert client.recv_json()["event"] == "pusher:connection_established"
    answers = []
    for _ in range(3):  # a burst of 5 (all its channels), then one a second
        for name in ("a", "b", "c"):
            client.send_json({"event": "pusher:subscribe", "data": {"channel": name}})
            answers.append(client.recv_json())
            client.send_json({"event": "pusher:unsubscribe", "data": {"channel": name}})
    assert [answer["event"] for answer in answers[:5]] == [
        "pusher_internal:subscription_succeeded"] * 5
    refused = answers[5]
    assert refused["event"] == "pusher:subscription_error"
    assert refused["data"]["status"] == 429


def test_fastfan_protocol_needs_a_token_key_when_only_pusher_apps_are_given(
        start_server: Any) -> None:
    server = start_pusher(start_server)
    with pytest.raises(HandshakeRefusedError) as refused:
        RawClient(server.host, server.port, "/")
    assert refused.value.status == 401


@pytest.fixture
def webhook_receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """A backend's webhook URL, and the (headers, body) of every request it took."""
    received: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers.items()), body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{http.server_address[1]}/pusher/webhooks", received
    http.shutdown()


def test_webhooks_in_pusher_format_pass_the_libraries_checks(
        start_server: Any, pusher_js: Any,
        webhook_receiver: tuple[str, list[tuple[dict[str, str], bytes]]]) -> None:
    url, received = webhook_receiver
    other_app = "2:other-key:other-secret"  # its events go signed with its own secret
    server = start_pusher(start_server, "--pusher-app", other_app, "--webhook-url", url,
                          "--webhook-format", "pusher", "--webhook-vacated-delay", "0",
                          "--webhook-publish", "private-*")
    alice, bob = pusher_js(server, "alice"), pusher_js(server, "bob")
    alice.subscribe("presence-room")
    for client in (alice, bob):
        client.subscribe("private-chat")
    bob.send(op="trigger", channel="private-chat", name="client-typing", data={"on": True})
    alice.wait(event="message", name="client-typing")
    alice.close()

    def events() -> list[dict[str, Any]]:
        checked = [python_backend(server).validate_webhook(
            headers["X-Pusher-Key"], headers["X-Pusher-Signature"], body)
            for headers, body in list(received)]
        assert None not in checked  # each one signed with the app's secret
        return [event for check in checked if check for event in check["events"]]

    expected = [
        {"name": "channel_occupied", "channel": "presence-room"},
        {"name": "member_added", "channel": "presence-room", "user_id": "alice"},
        {"name": "channel_occupied", "channel": "private-chat"},
        {"name": "client_event", "channel": "private-chat", "event": "client-typing",
         "data": '{"on":true}', "socket_id": bob.socket_id},
        {"name": "member_removed", "channel": "presence-room", "user_id": "alice"},
        {"name": "channel_vacated", "channel": "presence-room"}]
    wait_for(lambda: len(events()) >= len(expected))
    assert sorted(({k: v for k, v in event.items() if k != "id"} for event in events()),
                  key=json.dumps) == sorted(expected, key=json.dumps)
    headers, body = received[0]
    assert headers["X-Pusher-Key"] == KEY
    headers = {name.lower(): value for name, value in headers.items()}  # as Node's http has
    node_check = node_backend(server, op="webhook", headers=headers, body=body.decode())
    assert node_check["valid"] is True
    forged = {**headers, "x-pusher-signature": "0" * 64}
    assert node_backend(server, op="webhook", headers=forged, body=body.decode()) == {
        "valid": False, "events": None}


@pytest.fixture
def auth_endpoint() -> Iterator[str]:
    """An application's auth endpoint, as apps write it with the Python library: POST
    socket_id and channel_name (form-encoded, what pusher-js sends), its signature back."""
    backend = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
            channel, socket_id = form["channel_name"][0], form["socket_id"][0]
            member = {"user_id": "browser", "user_info": {"name": "Chromium"}} \
                if channel.startswith("presence-") else None
            body = json.dumps(backend.authenticate(channel, socket_id, member)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Access-Control-Allow-Origin", "*")  # the page is another origin
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{http.server_address[1]}/pusher/auth"
    http.shutdown()


@pytest.mark.parametrize("browser", ["chromium", "firefox"])
def test_pusher_js_in_a_browser_subscribes_receives_and_reconnects(
        start_server: Any, auth_endpoint: str, browser: str) -> None:
    program, kind = {"chromium": (CHROMIUM, Browser), "firefox": (FIREFOX, Firefox)}[browser]
    if program is None:
        pytest.skip(f"{browser} is not on PATH (./dev test installs it)")
    server = start_pusher(start_server)
    script = (JS / "node_modules/pusher-js/dist/web/pusher.min.js").read_text()
    channels = ["news", "private-orders", "presence-room"]
    with kind.showing("about:blank") as page:
        # (an indirect eval runs it as a page's script: `Pusher` on window)
        page.evaluate(f"(0, eval)({json.dumps(script)}), true")
        page.evaluate(f"""(async () => {{
            window.log = []
            const client = window.client = new Pusher({json.dumps(KEY)}, {{
              cluster: "fastfan", wsHost: {json.dumps(server.host)}, wsPort: {server.port},
              forceTLS: false, enabledTransports: ["ws"], disableStats: true,
              channelAuthorization: {{ endpoint: {json.dumps(auth_endpoint)} }} }})
            client.connection.bind("state_change", ({{ current }}) => log.push(["state", current]))
            for (const name of {json.dumps(channels)}) {{
              const channel = client.subscribe(name)
              channel.bind("pusher:subscription_succeeded", () => log.push(["subscribed", name]))
              channel.bind("update", (data) => log.push(["update", name, data]))
            }}
            return true }})()""")

        def logged(*entry: Any) -> bool:
            return list(entry) in page.evaluate("window.log")

        for channel in channels:
            wait_for(lambda channel=channel: logged("subscribed", channel))
        python_backend(server).trigger(channels, "update", {"n": 1})
        for channel in channels:
            wait_for(lambda channel=channel: logged("update", channel, {"n": 1}))

        kill_and_restart(server)  # pusher-js reconnects and subscribes again
        wait_for(lambda: page.evaluate("window.log.filter(e => e[1] === 'connected')"
                                       ".length") == 2, timeout=30)
        wait_for(lambda: python_backend(server).channels_info() == {
            "channels": {channel: {} for channel in channels}})
        python_backend(server).trigger(channels, "update", {"n": 2})
        for channel in channels:
            wait_for(lambda channel=channel: logged("update", channel, {"n": 2}))


def pusher_subscribed(server: Server, channel: str) -> RawClient:
    """A raw Pusher connection, as a browser's (permessage-deflate offered), subscribed."""
    client = RawClient(server.host, server.port, f"/app/{KEY}?protocol=7&client=js",
                       headers=BROWSER_HEADERS, source="127.0.0.2")
    assert client.recv_json()["event"] == "pusher:connection_established"
    client.send_json({"event": "pusher:subscribe", "data": {"channel": channel}})
    assert client.recv_json()["event"] == "pusher_internal:subscription_succeeded"
    return client


@pytest.mark.slow
def test_an_idle_pusher_connection_costs_little_more_than_a_fastfan_one(
        start_server: Any) -> None:
    """fastfan's own connection costs about 4 KiB (test_idle_memory); a Pusher one adds its
    PusherConnection and its socket id."""
    server = start_pusher(start_server, "--ping-interval", "600", "--ping-timeout", "1200")
    warm = [pusher_subscribed(server, "idle") for _ in range(300)]  # allocator arenas
    time.sleep(1.5)  # a heartbeat sweep releases the output buffers of the idle
    before = worker_rss_kib(server)
    count = 3000
    clients = [pusher_subscribed(server, "idle") for _ in range(count)]
    time.sleep(1.5)
    per_connection = (worker_rss_kib(server) - before) / count
    print(f"worker RSS per idle subscribed Pusher connection: {per_connection:.2f} KiB")
    assert per_connection < 5.5
    for client in warm + clients:
        client.close()
