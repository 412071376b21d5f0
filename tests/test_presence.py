"""Presence: who is subscribed to a channel, on every worker (the seed's group members)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import jwt
import pytest
from support.processes import children
from support.redis import RedisServer
from support.server import SECRET, Server, token
from support.waiting import wait_for
from support.wire import HandshakeRefusedError, RawClient
from support.workers import worker_of


def member(server: Server, user: str, channel: str = "room") -> tuple[RawClient, str]:
    client = RawClient(server.host, server.port, f"/?token={token(user)}")
    client_id = client.recv_json()["data"]["clientId"]
    client.subscribe(channel)
    return client, client_id


def presence(client: RawClient, channel: str = "room", kind: str = "presence",
             **fields: Any) -> dict[str, Any]:
    client.send_json({"type": kind, "channel": channel, **fields})
    reply = client.recv_json()
    assert reply["type"] == kind, reply
    return dict(reply)


def test_presence_lists_every_subscriber_and_counts_users(server: Server) -> None:
    members = [member(server, user) for user in ("alice", "alice", "bob")]
    outsider = server.connect("carol")
    reply = presence(outsider, id="p")
    assert reply["channel"] == "room" and reply["id"] == "p"
    assert reply["data"]["count"] == 3 and reply["data"]["users"] == 2
    assert sorted((c["clientId"], c["user"]) for c in reply["data"]["clients"]) == sorted(
        (client_id, user) for (_, client_id), user in zip(members, ("alice", "alice", "bob"),
                                                         strict=True))
    assert "truncated" not in reply["data"]
    stats = presence(outsider, kind="presence_stats")
    assert stats["data"] == {"count": 3, "users": 2}
    members[0][0].close()
    wait_for(lambda: presence(outsider)["data"]["count"] == 2, timeout=1)
    assert presence(outsider, "empty")["data"] == {"count": 0, "users": 0, "clients": []}


@pytest.mark.slow
def test_presence_needs_subscribe_permission_and_a_presence_channel(start_server: Any) -> None:
    server = start_server("--presence-channels", "room,lobby.*")
    client = RawClient(server.host, server.port, f"/?token={token('dan', subscribe=['room'])}")
    client.recv_json()
    for kind in ("presence", "presence_stats"):
        client.send_json({"type": kind, "channel": "lobby.1", "id": 1})
        assert client.recv_json()["code"] == 403
    client.send_json({"type": "presence", "channel": "bad channel!", "id": 2})
    assert client.recv_json()["code"] == 400
    allowed = server.connect("erin")
    allowed.send_json({"type": "presence", "channel": "other", "id": 3})
    reply = allowed.recv_json()
    assert reply["code"] == 400 and "--presence-channels" in reply["message"]
    assert presence(allowed, "lobby.1")["data"]["count"] == 0


@pytest.mark.slow
def test_presence_lists_at_most_the_limit(start_server: Any) -> None:
    server = start_server("--presence-limit", "2")
    members = [member(server, user) for user in ("a", "b", "c")]
    data = presence(server.connect())["data"]
    assert (data["count"], data["users"], len(data["clients"]), data["truncated"]) == (
        3, 3, 2, True)
    assert {c["clientId"] for c in data["clients"]} < {client_id for _, client_id in members}


@pytest.mark.slow
def test_presence_across_workers_and_a_killed_worker(start_server: Any) -> None:
    server = start_server("--workers", "2")
    workers = children(server.process.pid)
    held: dict[int, list[RawClient]] = {pid: [] for pid in workers}
    for n in range(40):
        client, _ = member(server, f"user{n}")
        pid = worker_of(server, client, workers)
        assert pid is not None
        held[pid].append(client)
    assert all(held.values()), "both workers should hold members"
    for clients in held.values():  # asked on either worker, the answer is the whole room
        data = presence(clients[0], kind="presence_stats")["data"]
        assert data == {"count": 40, "users": 40}
    victim, survivor = workers
    os.kill(victim, signal.SIGKILL)
    expected = len(held[survivor])
    wait_for(lambda: presence(held[survivor][0])["data"]["count"] == expected, timeout=1)
    survivors = {client.sock.getsockname()[1] for client in held[survivor]}
    assert len(survivors) == expected



@pytest.mark.slow
def test_presence_across_nodes_through_redis(start_server: Any, redis_server: RedisServer,
                                             tmp_path: Any) -> None:
    near = start_server("--redis", redis_server.url, "--presence-ttl", "3")
    far = start_server("--redis", redis_server.url, "--presence-ttl", "3", "--workers", "2")
    near.wait_ready()
    far.wait_ready()
    here = [member(near, "ann"), member(near, "bo")]
    there = [member(far, "cy") for _ in range(3)]
    asker = far.connect()
    expected = {client_id for _, client_id in here + there}
    wait_for(lambda: {c["clientId"] for c in presence(asker)["data"]["clients"]} == expected,
             timeout=1)
    assert presence(asker, kind="presence_stats")["data"] == {"count": 5, "users": 3}
    here[0][0].close()
    wait_for(lambda: presence(asker)["data"]["count"] == 4, timeout=1)
    for pid in [near.process.pid, *children(near.process.pid)]:  # a node dies without a word
        os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    assert presence(asker)["data"]["count"] == 4  # its client is not forgotten at once...
    wait_for(lambda: presence(asker)["data"]["count"] == 3, timeout=8)
    assert time.monotonic() - started < 3 + 2  # ...but within --presence-ttl (and a refresh)
    assert redis_server.command("EXISTS", "{fastfan:room}:presence") == b":1\r\n"


@pytest.mark.slow
def test_a_redis_outage_is_two_lines_of_presence_log_not_one_per_change(
        start_server: Any, redis_server: RedisServer) -> None:
    """While Redis is down, presence's writes fail: one line when they start failing and
    one when they work again, not one per subscribe and unsubscribe (2,565 lines in 4
    minutes with 1,000 subscribers, issue 26)."""
    server = start_server("--redis", redis_server.url, "--presence-ttl", "3")
    server.wait_ready()
    present = member(server, "ann")  # throughout: each refresh writes it
    redis_server.kill()
    wait_for(lambda: server.get("/ready")[0] == 503)
    churning = server.connect("bo")
    for _ in range(30):  # each a join and a leave, each pair a write of its own
        churning.send_json({"type": "subscribe", "channel": "room"})
        churning.send_json({"type": "unsubscribe", "channel": "room"})
        while churning.recv_json()["type"] != "unsubscribed":
            pass
    redis_server.start()
    back = wait_for(lambda: [line for line in server.log().splitlines()
                             if "presence: writes to Redis work again" in line])
    lines = [line for line in server.log().splitlines() if "presence:" in line]
    assert len(lines) == 2, lines
    assert "presence: writes to Redis fail" in lines[0]
    assert lines[1] == back[0]
    assert int(back[0].split("; ")[1].split()[0]) > 0  # "N changes were not written"
    present[0].close()


@pytest.mark.slow
def test_the_info_claim_is_what_others_see(start_server: Any, tmp_path: Any) -> None:
    redis = RedisServer(tmp_path / "redis.log")
    try:
        server = start_server("--redis", redis.url)
        server.wait_ready()
        info = {"name": "Ann", "avatar": "/a.png", "tags": [1, 2.5, None]}
        ann = RawClient(server.host, server.port, f"/?token={token('ann', info=info)}")
        ann_id = ann.recv_json()["data"]["clientId"]
        watching = server.connect("watcher")
        watching.send_json({"type": "subscribe", "channel": "room", "joinLeave": True})
        assert watching.recv_json()["type"] == "subscribed"
        ann.subscribe("room")
        _bo, bo_id = member(server, "bo")
        joins = [watching.recv_json() for _ in range(2)]
        assert joins[0]["data"] == {"clientId": ann_id, "user": "ann", "info": info}
        assert joins[1]["data"] == {"clientId": bo_id, "user": "bo"}  # no info, no key
        clients = {c["clientId"]: c for c in presence(watching)["data"]["clients"]}
        assert clients[ann_id] == {"clientId": ann_id, "user": "ann", "info": info}
        assert "info" not in clients[bo_id]
        assert redis.command("HEXISTS", "{fastfan:room}:presence", ann_id) == b":1\r\n"
    finally:
        redis.kill()


def test_an_info_claim_over_1_kib_is_refused(server: Server) -> None:
    with pytest.raises(HandshakeRefusedError) as refused:
        RawClient(server.host, server.port, f"/?token={token('big', info='x' * 1100)}")
    assert refused.value.status == 401
    assert b"claim 'info'" in refused.value.body


@pytest.mark.slow
def test_fastfan_token_mints_the_info_claim() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastfan", "token", "--sub", "ann", "--info", '{"name":"Ann"}'],
        env={**os.environ, "FASTFAN_JWT_SECRET": SECRET}, capture_output=True, text=True,
        check=True, timeout=30)
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["info"] == {"name": "Ann"}
    refused = subprocess.run(
        [sys.executable, "-m", "fastfan", "token", "--sub", "ann", "--info", "{not json"],
        env={**os.environ, "FASTFAN_JWT_SECRET": SECRET}, capture_output=True, text=True,
        timeout=30)
    assert refused.returncode == 2 and "expected JSON" in refused.stderr
