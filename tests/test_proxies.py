"""The same hooks over HTTP (issue 32): `--proxy-connect`, `--proxy-refresh`,
`--proxy-subscribe`, `--proxy-publish` and `--proxy-rpc` against a real aiohttp backend
written to Centrifugo's proxy documentation (tests/support/proxy_backend.py), with one
worker, two workers and two nodes on Redis, and each fault a backend can have."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import CHROMIUM, Browser
from support.cli import assert_usage_error, fastfan
from support.messages import ask, assert_delivered_but_not_kept
from support.proxy_backend import ProxyBackend
from support.redis import RedisServer
from support.server import Server, token
from support.waiting import wait_for
from support.wire import HandshakeRefusedError, RawClient
from support.workers import apart

from fastfan.client import Client, ServerError

TESTS = Path(__file__).parent
TIMEOUT = ("--proxy-timeout", "0.5")
EVERY_FIELD = {"transport": "websocket", "protocol": "json", "encoding": "json"}


@pytest.fixture
def backend() -> Iterator[ProxyBackend]:
    backend = ProxyBackend()
    yield backend
    backend.stop()


def join(server: Server, user: str, **headers: str) -> RawClient:
    """A client the backend lets in as `user` (its session cookie), past `welcome` and the
    `subscribed` of the inbox the connect proxy named."""
    client = RawClient(server.host, server.port, "/",
                       headers={"Cookie": f"session={user}", **headers})
    welcome = client.recv_json()
    assert welcome["type"] == "welcome" and welcome["data"]["user"] == user, welcome
    subscribed = client.recv_json()
    assert (subscribed["type"], subscribed["channel"]) == ("subscribed", f"inbox.{user}")
    return client


def refusal(server: Server, user: str | None) -> tuple[int, str]:
    headers = {} if user is None else {"Cookie": f"session={user}"}
    with pytest.raises(HandshakeRefusedError) as refused:
        RawClient(server.host, server.port, "/", headers=headers)
    return refused.value.status, refused.value.body.decode()


def still_open(client: RawClient) -> bool:
    return ask(client, {"type": "ping"}) == {"type": "pong", "id": 7}


def faults(server: Server, hook: str, cause: str) -> float:
    return server.metrics()[f'fastfan_hook_errors_total{{hook="{hook}",cause="{cause}"}}']


class Deployment:
    """One worker, two workers, or two nodes on one Redis: `apart` gives two clients held
    by different workers (or nodes)."""

    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers

    def apart(self, one: str, other: str) -> tuple[RawClient, RawClient]:
        return apart(self.servers, join, one, other)


@pytest.fixture(params=["one worker", "two workers", "two nodes on Redis"])
def deployment(request: pytest.FixtureRequest, start_server: Any,
               backend: ProxyBackend) -> Deployment:
    options = (*backend.options(), *TIMEOUT)
    if request.param == "one worker":
        return Deployment([start_server(*options)])
    if request.param == "two workers":
        server = start_server(*options, "--workers", "2")
        server.wait_ready()
        return Deployment([server])
    redis: RedisServer = request.getfixturevalue("redis_server")
    nodes = [start_server(*options, "--redis", redis.url) for _ in range(2)]
    for node in nodes:
        node.wait_ready()
    return Deployment(nodes)


@pytest.fixture
def proxied(start_server: Any, backend: ProxyBackend) -> Server:
    """One worker with every proxy, and no token key: the connect proxy decides alone."""
    return start_server(*backend.options(), *TIMEOUT, secret=None)


# Start-up ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "reason"), [
    (("--proxy-rpc", "ftp://backend/rpc"), "--proxy-rpc must be an http:// or https:// URL"),
    (("--proxy-publish", "http://"), "--proxy-publish must be an http:// or https:// URL"),
    (("--proxy-headers", "Cookie,Bad Header"), "--proxy-headers: 'Bad Header' is not a header"),
    (("--proxy-timeout", "0"), "--proxy-timeout: expected a positive number of seconds"),
])
def test_a_bad_proxy_option_is_a_usage_error(args: tuple[str, ...], reason: str) -> None:
    assert_usage_error(fastfan("run", "--insecure", *args), reason)


def test_a_proxy_and_an_app_hook_that_decide_the_same_are_a_usage_error() -> None:
    result = fastfan("run", "--insecure", "--app", "apps.chat:app", "--proxy-publish",
                     "http://127.0.0.1:9/publish", env={"PYTHONPATH": str(TESTS)})
    assert_usage_error(result, "--proxy-publish and --app's can_publish would both decide")


def test_an_app_and_the_rpc_proxy_share_the_methods(start_server: Any,
                                                    backend: ProxyBackend) -> None:
    server = start_server("--app", "apps.chat:app", *backend.options("rpc"), *TIMEOUT,
                          env={"PYTHONPATH": str(TESTS)})
    alice = RawClient(server.host, server.port, "/?user=alice")
    assert ask(alice, {"type": "rpc", "method": "sum", "data": [2, 3]})["data"] == 5  # proxy
    assert ask(alice, {"type": "rpc", "method": "whoami"})["data"]["user"] == "alice"  # app
    assert [body["method"] for _, body in backend.received("rpc")] == ["sum"]


def test_without_a_token_key_the_connect_proxy_is_enough_to_start(
        proxied: Server, backend: ProxyBackend) -> None:
    join(proxied, "alice").close()
    assert (f"proxies: connect {backend.url}/connect, refresh {backend.url}/refresh, "
            f"subscribe {backend.url}/subscribe, publish {backend.url}/publish, rpc "
            f"{backend.url}/rpc, --proxy-timeout 0.5 s, forwarding Cookie,Authorization,"
            "User-Agent,X-Forwarded-For,X-Real-Ip") in proxied.log()


# connect -----------------------------------------------------------------------------------

def test_connect_sends_centrifugos_request_with_the_allowed_headers(
        proxied: Server, backend: ProxyBackend) -> None:
    alice = join(proxied, "alice", **{"User-Agent": "tests/1", "X-Real-Ip": "10.0.0.7",
                                      "X-Secret": "not forwarded"})
    client_id = ask(alice, {"type": "stats"})["data"]["clientId"]  # as `welcome` said
    ((headers, body),) = backend.received("connect")
    # the connection's clientId from the start: the backend can tell whose later requests
    assert body == {"client": client_id, **EVERY_FIELD}
    assert ask(alice, {"type": "subscribe", "channel": "room"})["type"] == "subscribed"
    assert backend.received("subscribe")[-1][1]["client"] == client_id
    assert headers["Cookie"] == "session=alice" and headers["User-Agent"] == "tests/1"
    assert headers["X-Real-Ip"] == "10.0.0.7" and "X-Secret" not in headers, headers
    assert headers["Content-Type"] == "application/json"


def test_connect_gives_the_user_its_info_and_channels(deployment: Deployment) -> None:
    alice, bob = deployment.apart("alice", "bob")
    bob.publish("inbox.alice", {"text": "psst"})  # subscribed server-side, before welcome
    assert alice.recv_json()["data"] == {"text": "psst", "by": "bob"}
    for client in (alice, bob):
        client.subscribe("room")
    presence = wait_for(lambda: (p := ask(bob, {"type": "presence", "channel": "room"}))
                        ["data"]["count"] == 2 and p)
    assert {c["user"]: c["info"] for c in presence["data"]["clients"]} == {
        "alice": {"name": "Alice"}, "bob": {"name": "Bob"}}


def test_connect_refusals_are_http_statuses_before_the_upgrade(proxied: Server) -> None:
    assert refusal(proxied, None) == (401, "401 Unauthorized: no session\n")
    assert refusal(proxied, "banned") == (403, "403 Forbidden: banned\n")  # disconnect
    assert refusal(proxied, "odd")[0] == 403  # an error code that is no HTTP status


def test_a_valid_token_skips_the_connect_proxy(start_server: Any,
                                               backend: ProxyBackend) -> None:
    server = start_server(*backend.options("connect"), *TIMEOUT)  # and a token key
    client = RawClient(server.host, server.port, "/",
                       headers={"Authorization": f"Bearer {token('carol')}"})
    assert client.recv_json()["data"]["user"] == "carol"
    assert backend.received("connect") == []
    join(server, "alice").close()  # no token: the proxy decides
    assert len(backend.received("connect")) == 1
    with pytest.raises(HandshakeRefusedError) as refused:  # a bad one is a 401 before it
        RawClient(server.host, server.port, f"/?token={token('x', secret='y' * 40)}")
    assert refused.value.status == 401 and len(backend.received("connect")) == 1


@pytest.mark.parametrize(("fault", "status", "cause"), [
    ("500", 502, "http_status"), ("garbage", 502, "bad_body"), ("empty", 502, "bad_body"),
    ("hangup", 502, "http_status"), ("mute", 504, "timeout"), ("trickle", 504, "timeout")])
def test_a_faulty_connect_proxy_is_a_5xx_counted_by_cause(proxied: Server, fault: str,
                                                          status: int, cause: str) -> None:
    started = time.monotonic()
    assert refusal(proxied, f"fault-{fault}")[0] == status
    assert time.monotonic() - started < 2  # --proxy-timeout 0.5 cuts even a trickle
    assert faults(proxied, "authenticate", cause) == 1
    join(proxied, "alice").close()  # the server goes on


# refresh -----------------------------------------------------------------------------------

def test_refresh_extends_a_connection_or_ends_it_with_4001(deployment: Deployment,
                                                           backend: ProxyBackend) -> None:
    # expire_at in 2 s; the backend extends it 2 s each time
    brief = join(deployment.servers[-1], "brief")
    wait_for(lambda: len(backend.received("refresh")) >= 2, timeout=10)
    assert still_open(brief)
    ((headers, body), *_) = backend.received("refresh")
    assert body == {"client": body["client"], "user": "brief", **EVERY_FIELD}
    assert headers["Cookie"] == "session=brief"  # the upgrade's headers, on every request
    backend.expired.add("brief")
    assert brief.recv_close()[0] == 4001


def test_a_tokens_expiry_asks_the_refresh_proxy_too(start_server: Any,
                                                     backend: ProxyBackend) -> None:
    server = start_server(*backend.options("refresh"), *TIMEOUT)
    client = RawClient(server.host, server.port,
                       f"/?token={token('tom', ttl=2)}")
    assert client.recv_json()["data"]["user"] == "tom"
    wait_for(lambda: backend.received("refresh"), timeout=10)
    assert backend.received("refresh")[0][1]["user"] == "tom"
    assert still_open(client)


def test_without_a_refresh_proxy_expire_at_closes_with_4001(start_server: Any,
                                                            backend: ProxyBackend) -> None:
    server = start_server(*backend.options("connect"), *TIMEOUT, secret=None)
    brief = join(server, "brief")
    started = time.monotonic()
    assert brief.recv_close()[0] == 4001
    assert time.monotonic() - started < 4


def test_a_faulty_refresh_proxy_keeps_the_connection(start_server: Any,
                                                     backend: ProxyBackend) -> None:
    server = start_server(*backend.options(), *TIMEOUT, secret=None)
    client = join(server, "stale-500")  # expires in 2 s; its refresh answers 500
    wait_for(lambda: backend.received("refresh"), timeout=10)
    assert still_open(client)
    assert wait_for(lambda: faults(server, "refresh", "http_status") == 1)
    assert still_open(client)


# subscribe, publish, rpc -------------------------------------------------------------------

def test_subscribe_is_decided_by_the_proxy(deployment: Deployment,
                                           backend: ProxyBackend) -> None:
    alice, boss = deployment.apart("alice", "boss")
    assert ask(alice, {"type": "subscribe", "channel": "secret.plans"}) == {
        "type": "error", "code": 403, "message": "members only", "id": 7}
    assert ask(boss, {"type": "subscribe", "channel": "secret.plans"})["type"] == "subscribed"
    headers, body = backend.received("subscribe")[-1]
    assert body == {"client": body["client"], "user": "boss", "channel": "secret.plans",
                    **EVERY_FIELD}
    assert headers["Cookie"] == "session=boss"


def test_publish_is_checked_and_rewritten_by_the_proxy(deployment: Deployment,
                                                       backend: ProxyBackend) -> None:
    alice, bob = deployment.apart("alice", "bob")
    bob.subscribe("room")
    wait_for(lambda: ask(alice, {"type": "presence_stats", "channel": "room"})
             ["data"]["count"] == 1)
    assert ask(alice, {"type": "publish", "channel": "room", "data": "no text"}) == {
        "type": "error", "code": 400, "message": "a message needs text", "id": 7}
    alice.publish("room", {"text": "hi", "extra": 1})
    message = bob.recv_json()
    assert message["data"] == {"text": "hi", "by": "alice"}
    _, body = backend.received("publish")[-1]
    assert body == {"client": body["client"], "user": "alice", "channel": "room",
                    "data": {"text": "hi", "extra": 1}, **EVERY_FIELD}
    assert message["from"] == body["client"]  # the connection's clientId


@pytest.mark.parametrize("bus", ["one worker", "two nodes on Redis"])
def test_skip_history_delivers_a_publish_but_keeps_it_out_of_history(
        start_server: Any, backend: ProxyBackend, request: pytest.FixtureRequest,
        bus: str) -> None:
    options = (*backend.options(), *TIMEOUT, "--history-size", "10")
    if bus == "one worker":
        servers = [start_server(*options, secret=None)]
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        servers = [start_server(*options, "--redis", redis.url, secret=None)
                   for _ in range(2)]
        for server in servers:
            server.wait_ready()
    alice, bob = join(servers[0], "alice"), join(servers[-1], "bob")
    assert ask(alice, {"type": "publish", "channel": "kept.room",
                       "data": {"text": "x"}})["type"] == "published"
    assert [m["data"] for m in ask(alice, {"type": "history", "channel": "kept.room"})[
        "data"]["messages"]] == [{"text": "x", "by": "alice"}]
    assert_delivered_but_not_kept(alice, bob, "quiet.room", {"text": "unkept", "by": "alice"})


def test_rpc_is_answered_by_the_proxy(deployment: Deployment, backend: ProxyBackend) -> None:
    alice, _ = deployment.apart("alice", "bob")
    welcome_client = ask(alice, {"type": "stats"})["data"]["clientId"]
    reply = ask(alice, {"type": "rpc", "method": "whoami", "data": None})
    assert reply == {"type": "rpc_result", "id": 7,
                     "data": {"user": "alice", "client": welcome_client}}
    assert ask(alice, {"type": "rpc", "method": "nope", "data": 1}) == {
        "type": "error", "code": 404, "message": "no method nope", "id": 7}
    headers, body = backend.received("rpc")[-1]
    assert body == {"client": welcome_client, "user": "alice", "method": "nope", "data": 1,
                    **EVERY_FIELD}
    assert headers["Cookie"] == "session=alice"


@pytest.mark.parametrize("kind", ["subscribe", "publish", "rpc"])
@pytest.mark.parametrize(("fault", "code", "cause"), [
    ("500", 502, "http_status"), ("garbage", 502, "bad_body"), ("empty", 502, "bad_body"),
    ("hangup", 502, "http_status"), ("mute", 504, "timeout"), ("trickle", 504, "timeout")])
def test_a_faulty_proxy_is_an_error_and_the_connection_stays(
        proxied: Server, kind: str, fault: str, code: int, cause: str) -> None:
    alice = join(proxied, "alice")
    request = {"subscribe": {"type": "subscribe", "channel": f"fault.{fault}"},
               "publish": {"type": "publish", "channel": f"fault.{fault}",
                           "data": {"text": "x"}},
               "rpc": {"type": "rpc", "method": f"fault.{fault}", "data": None}}[kind]
    started = time.monotonic()
    reply = ask(alice, request)
    assert time.monotonic() - started < 2
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert f"proxy {kind}" in reply["message"]
    assert still_open(alice)
    hook = {"subscribe": "can_subscribe", "publish": "can_publish", "rpc": "rpc"}[kind]
    assert faults(proxied, hook, cause) == 1
    assert proxied.log().count(f"hook {hook} failed ({cause})") == 1


@pytest.mark.parametrize("kind", ["subscribe", "publish", "rpc"])
def test_a_disconnect_answer_closes_the_connection_with_its_code(proxied: Server,
                                                                 kind: str) -> None:
    alice = join(proxied, "alice")
    alice.send_json({"subscribe": {"type": "subscribe", "channel": "fault.disconnect"},
                     "publish": {"type": "publish", "channel": "fault.disconnect",
                                 "data": {"text": "x"}},
                     "rpc": {"type": "rpc", "method": "fault.disconnect"}}[kind])
    assert alice.recv_close() == (4503, "go away")


def test_a_slow_proxy_delays_only_its_own_connection(proxied: Server) -> None:
    slow, quick = join(proxied, "slow"), join(proxied, "quick")
    slow.send_json({"type": "rpc", "method": "fault.mute", "id": 1})
    started = time.monotonic()
    assert ask(quick, {"type": "rpc", "method": "sum", "data": [1, 2]})["data"] == 3
    assert time.monotonic() - started < 0.4


# The clients' rpc --------------------------------------------------------------------------

def test_the_python_clients_rpc(proxied: Server) -> None:
    async def main() -> None:
        url = f"ws://{proxied.host}:{proxied.port}/"
        async with Client(url, headers={"Cookie": "session=alice"}) as client:
            assert await client.rpc("sum", [1, 2, 3]) == 6
            with pytest.raises(ServerError) as refused:
                await client.rpc("nope")
            assert refused.value.code == 404
    asyncio.run(main())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (./dev test installs it)")
def test_the_browser_clients_rpc(start_server: Any, backend: ProxyBackend) -> None:
    server = start_server(*backend.options("rpc"), *TIMEOUT)  # a token lets the page in
    with Browser.showing("about:blank") as page:
        answers = page.evaluate(f"""(async () => {{
            const ff = await import('http://{server.host}:{server.port}/fastfan.js')
            const client = new ff.Client({json.dumps(server.url())}, {{
                token: {json.dumps(token("ana"))} }})
            await new Promise((resolve) => client.on('connected', resolve))
            const sum = await client.rpc('sum', [1, 2, 3])
            const refused = await client.rpc('nope').catch((error) => error.code)
            client.close()
            return [sum, refused]
        }})()""")
    assert answers == [6, 404]
