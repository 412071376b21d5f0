"""join and leave, for the subscribers that ask for them, on every worker and node."""

from __future__ import annotations

import functools
import json
import os
import signal
from typing import Any

import pytest
from support.processes import children
from support.redis import RedisServer
from support.server import Server, token
from support.waiting import wait_for
from support.wire import RawClient
from support.workers import every, place, worker_of


def watcher(server: Server, channel: str = "room", timeout: float = 5.0) -> RawClient:
    client = server.connect("watcher", timeout=timeout)
    client.send_json({"type": "subscribe", "channel": channel, "joinLeave": True})
    assert client.recv_json() == {"type": "subscribed", "channel": channel}
    return client


def joining(server: Server, user: str, channel: str = "room") -> tuple[RawClient, str]:
    client = RawClient(server.host, server.port, f"/?token={token(user)}")
    client_id = client.recv_json()["data"]["clientId"]
    client.subscribe(channel)
    return client, client_id


@pytest.mark.parametrize("bus", ["one worker", "two workers", "redis"])
@pytest.mark.slow
def test_watchers_see_others_join_and_leave_in_order(start_server: Any, tmp_path: Any,
                                                     bus: str) -> None:
    redis = RedisServer(tmp_path / "redis.log") if bus == "redis" else None
    try:
        if redis is not None:
            servers = [start_server("--redis", redis.url), start_server("--redis", redis.url)]
        else:
            servers = [start_server(*(("--workers", "2") if bus == "two workers" else ()))] * 2
        for server in servers:
            server.wait_ready()
        watchers = [watcher(servers[0]) for _ in range(3)]
        plain = servers[0].connect("plain").subscribe("room")  # did not ask: gets none
        events: list[list[dict[str, Any]]] = [[] for _ in watchers]

        def seen_by_all(count: int) -> None:
            """Each watcher's next events up to `count` of the guests' (the other watchers'
            and `plain`'s joins come first). Each step waits for them: a join and a leave
            of one client in one loop turn cancel out (docs/protocol.md)."""
            for client, seen in zip(watchers, events, strict=True):
                while len(seen) < count:
                    event = client.recv_json()
                    if event["data"]["user"] not in ("watcher", "plain"):
                        seen.append(event)

        guest, guest_id = joining(servers[1], "guest")
        seen_by_all(1)
        guest.send_json({"type": "unsubscribe", "channel": "room"})
        assert guest.recv_json()["type"] == "unsubscribed"
        seen_by_all(2)
        again, again_id = joining(servers[1], "again")
        seen_by_all(3)
        again.close()  # a disconnect is a leave too
        seen_by_all(4)
        expected = [("join", guest_id, "guest"), ("leave", guest_id, "guest"),
                    ("join", again_id, "again"), ("leave", again_id, "again")]
        for seen in events:
            assert [(e["type"], e["data"]["clientId"], e["data"]["user"]) for e in seen] \
                == expected
            assert {e["channel"] for e in seen} == {"room"}
        plain.send_json({"type": "ping"})
        assert plain.recv_json() == {"type": "pong"}  # no join or leave came before it
    finally:
        if redis is not None:
            redis.kill()


def test_a_watcher_gets_no_event_of_its_own_and_stops_with_unsubscribe(server: Server) -> None:
    first = watcher(server)
    second = watcher(server)
    event = first.recv_json()  # the second watcher's join, not the first's own
    assert event["type"] == "join" and event["data"]["user"] == "watcher"
    second.send_json({"type": "unsubscribe", "channel": "room"})
    assert second.recv_json()["type"] == "unsubscribed"
    assert first.recv_json()["type"] == "leave"
    late = joining(server, "late")
    second.send_json({"type": "ping"})
    assert second.recv_json() == {"type": "pong"}  # unsubscribed: no more events either
    assert first.recv_json()["type"] == "join"
    first.send_json({"type": "stats"})
    assert first.recv_json()["data"]["channels"] == ["room"]  # the watch is not a channel
    late[0].close()
    assert first.recv_json()["type"] == "leave"


def test_join_leave_must_be_a_boolean(server: Server) -> None:
    client = server.connect()
    client.send_json({"type": "subscribe", "channel": "room", "joinLeave": "yes", "id": 1})
    reply = client.recv_json()
    assert reply["code"] == 400 and "joinLeave" in reply["message"]
    wait_for(lambda: server.metrics()["fastfan_subscriptions"] == 0)


@pytest.mark.slow
def test_a_killed_worker_s_clients_leave(start_server: Any) -> None:
    server = start_server("--workers", "2")
    workers = children(server.process.pid)
    clients = []
    for n in range(30):  # joiners on both workers, in the order they joined
        client, client_id = joining(server, f"u{n}")
        clients.append((client, client_id, worker_of(server, client, workers)))
    # a watcher on one worker, then kill the other
    spares: list[RawClient] = []  # kept open: a watcher's own leave would be one more event
    (watch,) = every(place(server, connect=lambda: watcher(server), workers=[workers[0]],
                           spares=spares))
    victims = {client_id for _, client_id, pid in clients if pid == workers[1]}
    assert victims
    late: list[tuple[Any, str]] = []  # joins the watcher sees: at least 6, and until the
    late_on_victim: set[str] = set()  # kernel has put some on the victim (1 in 64 it would
    while (len(late) < 6 or not late_on_victim) and len(late) < 60:  # not, of 6)
        client, client_id = joining(server, f"late{len(late)}")
        late.append((client, client_id))
        if worker_of(server, client, workers) == workers[1]:
            late_on_victim.add(client_id)
    assert late_on_victim, "some late joiners should be on the victim worker"
    late_ids = {client_id for _, client_id in late}
    joined: set[str] = set()
    while not late_ids <= joined:
        event = watch.recv_json()
        assert event["type"] == "join"
        joined.add(event["data"]["clientId"])
    os.kill(workers[1], signal.SIGKILL)
    leaves = set()
    while not victims | late_on_victim <= leaves:  # every client it had leaves, whether it
        event = watch.recv_json()                  # joined before the watcher or after, and
        assert event["type"] == "leave", event     # only leaves come
        leaves.add(event["data"]["clientId"])


@pytest.mark.slow
def test_every_client_of_a_killed_worker_leaves_for_the_other_s_watchers(
        start_server: Any) -> None:
    """Watchers on both workers, each a client the others watch: whichever joined first, all
    of the killed worker's clients leave for the survivor's watchers, at every kill. (The
    survivor once sent only the leaves of the joins it had passed on: a client that joined
    before any watcher of the survivor's had none, and 2 runs in 4 saw no leave at all.)"""
    server = start_server("--workers", "2")
    client_ids: dict[RawClient, str] = {}

    def connect() -> RawClient:
        client = RawClient(server.host, server.port, f"/?token={token('member')}")
        client_ids[client] = client.recv_json()["data"]["clientId"]
        return client

    def two_workers_but(killed: int) -> list[int] | None:
        pids = server.workers()
        return pids if len(pids) == 2 and killed not in pids else None

    victim = 0
    for kill in range(4):  # the lower pid each time: the replacement's is higher, so each
        # worker index dies twice, short of the master's stop at quick deaths in a row
        victim, survivor = wait_for(functools.partial(two_workers_but, victim))
        server.wait_ready()
        placed = place(server, per_worker=2, connect=connect, channels=(f"room{kill}",),
                       options={"joinLeave": True})
        victims = {client_ids[client] for client in placed[victim]}
        os.kill(victim, signal.SIGKILL)
        for watching in placed[survivor]:
            watching.sock.settimeout(3)
            left: set[str] = set()
            while not victims <= left:
                event = watching.recv_json()
                if event["type"] == "leave":
                    left.add(event["data"]["clientId"])
            assert left == victims
        for client in every(placed):
            client.close()


def test_the_join_leave_channel_is_not_counted_as_a_channel(server: Server) -> None:
    watching = watcher(server)
    figures = server.metrics()
    assert (figures["fastfan_channels"], figures["fastfan_subscriptions"]) == (1, 1)
    watching.close()


def node_watched_from_another(start_server: Any, redis: RedisServer, *args: str
                              ) -> tuple[Server, RawClient, RawClient, str]:
    """Two nodes on `redis`: a watcher of "room" on one (waiting up to 10 s for an event),
    and a client of the other, "gone", whose join the watcher has seen."""
    near, far = (start_server("--redis", redis.url, *args) for _ in range(2))
    near.wait_ready()
    far.wait_ready()
    watch = watcher(far, timeout=10)
    gone, gone_id = joining(near, "gone")
    assert watch.recv_json()["data"]["clientId"] == gone_id  # its join
    return near, watch, gone, gone_id


@pytest.mark.slow
def test_a_dead_node_s_clients_leave_within_the_presence_ttl(
        start_server: Any, redis_server: RedisServer) -> None:
    near, watch, _gone, gone_id = node_watched_from_another(
        start_server, redis_server, "--presence-ttl", "3")
    for pid in [near.process.pid, *children(near.process.pid)]:  # no word from that node
        os.kill(pid, signal.SIGKILL)
    leave = watch.recv_json()  # within --presence-ttl and a refresh (the client waits 10 s)
    assert leave == {"type": "leave", "channel": "room",
                     "data": {"clientId": gone_id, "user": "gone"}}


@pytest.mark.slow
def test_a_killed_worker_s_clients_leave_through_redis_at_once(
        start_server: Any, redis_server: RedisServer) -> None:
    """The master knows: the replacement worker clears its predecessor's clients from
    presence and announces their leave, long before --presence-ttl (60 s here)."""
    near, watch, _gone, gone_id = node_watched_from_another(start_server, redis_server)
    (worker,) = children(near.process.pid)
    os.kill(worker, signal.SIGKILL)
    assert watch.recv_json() == {"type": "leave", "channel": "room",
                                 "data": {"clientId": gone_id, "user": "gone"}}
    watch.send_json({"type": "presence_stats", "channel": "room"})
    assert watch.recv_json()["data"] == {"count": 1, "users": 1}  # the watcher alone


class Tally:
    """A RawClient's frames read and their payload bytes, to hold `stats` against."""

    def __init__(self, client: RawClient) -> None:
        self.client, self.messages, self.bytes = client, 0, 0

    def recv_json(self) -> Any:
        _, _, payload = self.client.recv_frame()
        self.messages += 1
        self.bytes += len(payload)
        return json.loads(payload)


@pytest.mark.parametrize("bus", ["one worker", "two workers"])
def test_a_burst_of_joins_and_leaves_reaches_every_watcher_once(
        start_server: Any, bus: str) -> None:
    """Joiners that watch too, subscribing and then closing all at once: their events of
    one loop turn go to each watcher together (Hub._deliver_events), and a joiner gets
    others' joins, never its own; each event counts as a message in the watcher's stats."""
    server = start_server(*(("--workers", "2") if bus == "two workers" else ()))
    server.wait_ready()
    watchers = []
    for _ in range(5):
        tally = Tally(RawClient(server.host, server.port, f"/?token={token('watcher')}"))
        tally.recv_json()  # welcome
        tally.client.send_json({"type": "subscribe", "channel": "room", "joinLeave": True})
        while tally.recv_json()["type"] != "subscribed":
            pass  # the joins of the watchers before it
        watchers.append(tally)
    joiners = {}
    for n in range(40):
        client = RawClient(server.host, server.port, f"/?token={token(f'j{n}')}")
        joiners[client.recv_json()["data"]["clientId"]] = client
    for client in joiners.values():  # all at once: many land in one loop turn
        client.send_json({"type": "subscribe", "channel": "room", "joinLeave": True})
    wait_for(lambda: server.metrics()["fastfan_subscriptions"] == len(watchers) + len(joiners))
    for own, client in joiners.items():
        client.send_json({"type": "ping"})
        joins = []
        while (reply := client.recv_json())["type"] != "pong":
            if reply["type"] == "join":
                joins.append(reply["data"]["clientId"])
        assert own not in joins and len(joins) == len(set(joins)), (own, joins)
    for client in joiners.values():
        client.close()
    for tally in watchers:
        seen: list[tuple[str, str]] = []
        while len(seen) < 2 * len(joiners):
            event = tally.recv_json()
            if event["data"]["user"] != "watcher":
                seen.append((event["type"], event["data"]["clientId"]))
        assert sorted(seen) == sorted([("join", i) for i in joiners]
                                      + [("leave", i) for i in joiners])
        for client_id in joiners:  # each one's join before its leave
            assert seen.index(("join", client_id)) < seen.index(("leave", client_id))
        tally.client.send_json({"type": "ping"})
        assert tally.recv_json() == {"type": "pong"}  # and nothing more before it
        tally.client.send_json({"type": "stats"})
        figures = tally.client.recv_json()["data"]
        assert (figures["messagesSent"], figures["bytesSent"]) == (tally.messages, tally.bytes)
