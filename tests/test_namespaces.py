"""Namespaces (`[[namespace]]` in --config): each option on the channels it takes, the
global options on the others, `config show`, and a reload that changes a namespace with
connections open. (What a bus keeps, history, the cache and the subscriber bound, is in
test_bus_contract, on every bus.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support.api import call, start_api
from support.cli import fastfan
from support.messages import subscribe
from support.proxy_backend import ProxyBackend
from support.server import SECRET, Server, token
from support.waiting import collect, wait_for
from support.wire import RawClient
from support.workers import every, place
from test_reload import reload

NAMESPACES = """
[[namespace]]
channels = ["feed.*"]
publish = "none"

[[namespace]]
channels = ["room.*"]
publish = "subscribers"
join_leave = false

[[namespace]]
channels = ["log.*"]
history_size = 10
recover = false
presence = false
"""


def start(start_server: Any, tmp_path: Path, text: str, *args: str,
          **kwargs: Any) -> tuple[Server, int]:
    config = tmp_path / "fastfan.toml"
    config.write_text(text)
    return start_api(start_server, "--config", str(config), *args, **kwargs)


def connect(server: Server, sub: str, **claims: Any) -> RawClient:
    client = RawClient(server.host, server.port, f"/?token={token(sub, **claims)}")
    assert client.recv_json()["type"] == "welcome"
    return client


def error(client: RawClient, message: dict[str, Any]) -> tuple[int, str]:
    client.send_json(message)
    reply = client.recv_json()
    assert reply["type"] == "error", reply
    return reply["code"], reply["message"]


def test_publish_rules(tmp_path: Path, start_server: Any) -> None:
    server, api_port = start(start_server, tmp_path, NAMESPACES)
    # publish = "none": the server API only, whatever the token allows
    reader = server.connect("reader").subscribe("feed.prices")
    assert error(reader, {"type": "publish", "channel": "feed.prices", "data": 1}) == (
        403, "feed.prices takes publishes from the server API only")
    assert call(api_port, "publish", {"channel": "feed.prices", "data": 2})[0] == 200
    assert reader.recv_json()["data"] == 2
    # publish = "subscribers": a subscriber whose token allows no publish at all may
    # publish; a client allowed everything that is not subscribed may not
    member = connect(server, "member", publish=[]).subscribe("room.1")
    stranger = server.connect("stranger")
    member.publish("room.1", "hello", id=1)
    assert member.recv_json()["data"] == "hello"
    assert member.recv_json() == {"type": "published", "channel": "room.1", "id": 1}
    assert error(stranger, {"type": "publish", "channel": "room.1", "data": "x"}) == (
        403, "only subscribers of room.1 may publish to it")
    # a channel no namespace takes: the token decides, as without namespaces
    assert error(member, {"type": "publish", "channel": "other", "data": "x"})[0] == 403
    stranger.publish("other", "fine", id=2)
    assert stranger.recv_json() == {"type": "published", "channel": "other", "id": 2}


def test_join_leave_recover_and_presence_per_namespace(tmp_path: Path,
                                                       start_server: Any) -> None:
    server, _ = start(start_server, tmp_path, NAMESPACES, "--history-size", "5",
                      "--history-channels", "plain.h")
    client = server.connect()
    # join_leave = false
    assert error(client, {"type": "subscribe", "channel": "room.1", "joinLeave": True}) == (
        403, "join and leave are off for room.1 (its namespace's join_leave)")
    assert subscribe(client, "room.1") == {"type": "subscribed", "channel": "room.1"}
    assert subscribe(client, "plain", joinLeave=True)["type"] == "subscribed"
    # presence = false on log.*, the global "*" elsewhere
    assert error(client, {"type": "presence", "channel": "log.1"})[0] == 400
    client.send_json({"type": "presence_stats", "channel": "plain"})
    assert client.recv_json()["data"] == {"count": 1, "users": 1}
    # recover = false: history is kept (10 messages, not the global 5), a recovering
    # subscribe is told it did not recover and gets nothing it missed
    first = subscribe(client, "log.1")
    for n in range(12):
        client.publish("log.1", n)
    assert [client.recv_json()["data"] for _ in range(12)] == list(range(12))
    again = server.connect()
    reply = subscribe(again, "log.1", recover={"offset": 2, "epoch": first["epoch"]})
    assert reply == {"type": "subscribed", "channel": "log.1", "offset": 12,
                     "epoch": first["epoch"], "recovered": False}
    assert collect(again, 0.3) == []
    again.send_json({"type": "history", "channel": "log.1", "limit": 100})
    assert [m["data"] for m in again.recv_json()["data"]["messages"]] == list(range(2, 12))
    # a channel no namespace takes recovers as before
    kept = subscribe(client, "plain.h")
    client.publish("plain.h", "a")
    assert client.recv_json()["data"] == "a"
    reply = subscribe(again, "plain.h", recover={"offset": 0, "epoch": kept["epoch"]})
    assert reply["recovered"] is True and again.recv_json()["data"] == "a"


def test_hooks_off_in_a_namespace(tmp_path: Path, start_server: Any) -> None:
    """The App refuses secret.* to all but its boss and crashes on crash.*: a namespace
    with hooks = false takes its channels out of its hands; the others stay in them."""
    server, _ = start(start_server, tmp_path,
                      '[[namespace]]\nchannels = ["secret.open.*", "crash.*"]\nhooks = false\n',
                      "--app", "apps.chat:app",
                      env={"PYTHONPATH": str(Path(__file__).parent)})
    client = server.connect()
    assert client.recv_json()["data"] == {"hello": "alice"}  # the App's on connect
    assert subscribe(client, "secret.open.1") == {"type": "subscribed",
                                                  "channel": "secret.open.1"}
    assert error(client, {"type": "subscribe", "channel": "secret.shut"}) == (
        403, "members only")
    client.publish("crash.1", "fine", id=1)
    assert client.recv_json() == {"type": "published", "channel": "crash.1", "id": 1}


def test_proxies_off_in_a_namespace(tmp_path: Path, start_server: Any) -> None:
    """The backend lets only its boss into secret.* and wants {"text": ...} published:
    namespaces with proxy_subscribe / proxy_publish = false are not asked about."""
    backend = ProxyBackend()
    try:
        server, _ = start(start_server, tmp_path,
                          '[[namespace]]\nchannels = ["secret.open.*"]\n'
                          'proxy_subscribe = false\n'
                          '[[namespace]]\nchannels = ["free.*"]\nproxy_publish = false\n',
                          *backend.options("subscribe", "publish"))
        client = server.connect()
        assert subscribe(client, "secret.open.1")["type"] == "subscribed"
        assert error(client, {"type": "subscribe", "channel": "secret.shut"}) == (
            403, "members only")
        client.publish("free.1", "no text", id=1)
        assert client.recv_json() == {"type": "published", "channel": "free.1", "id": 1}
        assert error(client, {"type": "publish", "channel": "other", "data": "no text"}) \
            == (400, "a message needs text")
        assert [body["channel"] for _, body in backend.received("subscribe")] == [
            "secret.shut"]
        assert [body["channel"] for _, body in backend.received("publish")] == ["other"]
    finally:
        backend.stop()


def test_config_show_prints_the_namespaces(tmp_path: Path) -> None:
    config = tmp_path / "fastfan.toml"
    config.write_text(f'jwt_secret = "{SECRET}"\n' + NAMESPACES)
    result = fastfan("config", "show", "--config", str(config))
    assert result.returncode == 0, result.stderr
    tables = result.stdout.split("[[namespace]]\n")[1:]
    assert tables == ['channels = ["feed.*"]\npublish = "none"\n\n',
                      'channels = ["room.*"]\njoin_leave = false\npublish = "subscribers"\n\n',
                      'channels = ["log.*"]\nhistory_size = 10\nrecover = false\n'
                      'presence = false\n']
    # the tables it prints are a file's, the same namespaces
    shown = tmp_path / "shown.toml"
    shown.write_text(f'jwt_secret = "{SECRET}"\n[[namespace]]\n' + "[[namespace]]\n".join(tables))
    assert fastfan("config", "show", "--config", str(shown)).stdout == result.stdout


def test_a_reload_changes_a_namespace_on_every_worker_dropping_nobody(
        tmp_path: Path, start_server: Any) -> None:
    config, pid_file = tmp_path / "fastfan.toml", tmp_path / "fastfan.pid"
    before = '[[namespace]]\nchannels = ["feed.*"]\npresence = false\n'
    server, api_port = start(start_server, tmp_path, before, "--workers", "2",
                             "--pid-file", str(pid_file))
    server.wait_ready()
    subscribers = every(place(server, 2, channels=("feed.a",)))
    asked = subscribers[0]
    assert error(asked, {"type": "presence_stats", "channel": "feed.a"})[0] == 400
    assert call(api_port, "publish", {"channel": "feed.a", "data": "before"})[0] == 200
    for subscriber in subscribers:
        subscriber.publish("feed.a", "from a client")
    for subscriber in subscribers:
        assert sorted(subscriber.recv_json()["data"] for _ in range(len(subscribers) + 1)) \
            == ["before"] + ["from a client"] * len(subscribers)
    config.write_text(before.replace("presence = false", 'publish = "none"'))
    reload(server, pid_file)
    wait_for(lambda: server.log().count("reloaded") == 2)
    assert "namespace ['feed.*']: presence False -> None, publish 'token' -> 'none'" \
        in server.log()
    # on every worker, for the connections open before the reload: presence counts them
    # now, and their publishes are refused
    for subscriber in subscribers:
        assert wait_for(lambda s=subscriber: _presence_count(s, "feed.a")) == len(subscribers)
        assert error(subscriber, {"type": "publish", "channel": "feed.a", "data": 1}) == (
            403, "feed.a takes publishes from the server API only")
    assert call(api_port, "publish", {"channel": "feed.a", "data": "after"})[0] == 200
    for subscriber in subscribers:  # nobody dropped
        assert subscriber.recv_json()["data"] == "after"


def _presence_count(client: RawClient, channel: str) -> int | None:
    client.send_json({"type": "presence_stats", "channel": channel, "id": "p"})
    reply = client.recv_json()
    while reply.get("id") != "p":
        reply = client.recv_json()
    return reply["data"]["count"] if reply["type"] == "presence_stats" else None
