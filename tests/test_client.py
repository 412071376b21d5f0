"""fastfan.client against real `fastfan run` processes, and its delay and recovery rules
as units."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine
from typing import Any

import pytest
from support.redis import RedisServer
from support.server import Server, kill, kill_and_restart, restart, token

from fastfan.client import Client, ServerError, Subscription, backoff_delay, token_expiry


def run(test: Coroutine[Any, Any, None], timeout: float = 30.0) -> None:
    asyncio.run(asyncio.wait_for(test, timeout))


def client_of(server: Server, sub: str = "alice", **options: Any) -> Client:
    claims = {name: options.pop(name) for name in ("subscribe", "publish") if name in options}
    return Client(server.url(), token=token(sub, **claims), **options)


async def next_of(subscription: Subscription, timeout: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        return await anext(subscription)


def test_subscribe_publish_and_receive_in_order(server: Server) -> None:
    async def test() -> None:
        async with client_of(server) as client:
            sub = await client.subscribe("chat.lobby")
            replies = [await client.publish("chat.lobby", {"n": n}) for n in range(50)]
            assert all(reply["type"] == "published" and reply["channel"] == "chat.lobby"
                       for reply in replies)
            assert len({reply["id"] for reply in replies}) == 50  # each matched by its id
            received = [await next_of(sub) for _ in range(50)]
            assert [message["data"] for message in received] == [{"n": n} for n in range(50)]
            assert received[0]["type"] == "message" and received[0]["from"]
    run(test())


def test_message_callbacks_and_unsubscribe_ending_the_iteration(server: Server) -> None:
    async def test() -> None:
        async with client_of(server) as listener, client_of(server, "bob") as publisher:
            seen: list[Any] = []
            called = await listener.subscribe("news")
            called.on("message", lambda message: seen.append(message["data"]))
            iterated = await listener.subscribe("sport")
            await publisher.publish("news", 1)
            await publisher.publish("sport", 2)
            assert (await next_of(iterated))["data"] == 2
            assert seen == [1]  # sent before "sport" by the same publisher: already here
            await iterated.unsubscribe()
            assert [message async for message in iterated] == []
            assert (await listener.stats())["data"]["channels"] == ["news"]
    run(test())


def test_close_ends_the_subscriptions_and_later_requests(server: Server) -> None:
    async def test() -> None:
        client, closes = client_of(server), list[int]()
        await client.connect()
        client.on("disconnected", closes.append)
        sub = await client.subscribe("chat.lobby")
        await client.close()
        assert [message async for message in sub] == [] and closes == [1000]
        with pytest.raises(ConnectionError, match="closed"):
            await client.stats()
    run(test())


def test_an_error_reply_raises_server_error_and_the_connection_goes_on(server: Server) -> None:
    async def test() -> None:
        async with client_of(server, publish=["news.*"]) as client:
            with pytest.raises(ServerError) as refused:
                await client.publish("chat.lobby", "hi")
            assert refused.value.code == 403
            assert refused.value.message == "not permitted to publish to chat.lobby"
            assert (await client.publish("news.world", "ok"))["type"] == "published"
    run(test())


def test_presence_join_and_leave_and_history(server: Server) -> None:
    async def test() -> None:
        async with client_of(server) as client, client_of(server, "bob") as other:
            joined: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            sub = await client.subscribe("chat.lobby", join_leave=True)
            sub.on("join", joined.put_nowait)
            sub.on("leave", joined.put_nowait)
            other_sub = await other.subscribe("chat.lobby")
            async with asyncio.timeout(5):
                event = await joined.get()
            assert event["type"] == "join" and event["data"]["user"] == "bob"
            reply = await client.presence("chat.lobby")
            assert {c["user"] for c in reply["data"]["clients"]} == {"alice", "bob"}
            assert (await client.presence_stats("chat.lobby"))["data"] == {"count": 2,
                                                                           "users": 2}
            await other_sub.unsubscribe()
            async with asyncio.timeout(5):
                assert (await joined.get())["type"] == "leave"
            # No history is kept on this server: nothing to tell, and no error.
            assert (await client.history("chat.lobby", limit=10))["data"] == {
                "offset": 0, "epoch": "", "messages": []}
    run(test())


def test_what_the_server_would_refuse_raises_before_it_is_sent(server: Server) -> None:
    async def test() -> None:
        async with client_of(server, max_message_size=1000) as client:
            before = (await client.stats())["data"]["messagesReceived"]
            for channel in ("", "x" * 256, "chat lobby", "chat.*", "é"):
                with pytest.raises(ValueError, match="invalid channel name"):
                    await client.publish(channel, 1)
                with pytest.raises(ValueError, match="invalid channel name"):
                    await client.subscribe(channel)
            with pytest.raises(ValueError, match="over the 1000-byte limit"):
                await client.publish("chat.lobby", "x" * 1000)
            await client.publish("x" * 255, "x" * 600)  # the longest name, a message that fits
            after = (await client.stats())["data"]["messagesReceived"]
            assert after == before + 2  # the publish that fit, and this stats
    run(test())


def test_stats(server: Server) -> None:
    async def test() -> None:
        async with client_of(server, "carol") as client:
            await client.subscribe("a")
            await client.subscribe("b")
            reply = await client.stats()
            assert reply["type"] == "stats"
            assert reply["data"]["user"] == "carol"
            assert reply["data"]["clientId"] == client.welcome["data"]["clientId"]  # type: ignore[index]
            assert sorted(reply["data"]["channels"]) == ["a", "b"]
    run(test())


def test_after_the_server_is_killed_and_restarted_the_client_resubscribes(server: Server) -> None:
    async def test() -> None:
        connected, closes = asyncio.Event(), list[int]()
        async with client_of(server, reconnect_base=0.05, reconnect_cap=0.5) as client:
            client.on("connected", lambda welcome: connected.set())
            client.on("disconnected", closes.append)
            sub = await client.subscribe("chat.lobby")
            resubscribed = asyncio.Event()
            sub.on("subscribed", lambda reply: resubscribed.set())
            first = client.welcome
            kill_and_restart(server)  # the loop is blocked: the client sees it all after
            async with asyncio.timeout(10):
                await resubscribed.wait()
            assert connected.is_set() and closes == [1006] and client.welcome != first
            async with client_of(server, "bob") as publisher:
                await publisher.publish("chat.lobby", "after the restart")
            assert (await next_of(sub))["data"] == "after the restart"
    run(test())


@pytest.mark.slow
def test_a_subscription_refused_with_503_after_a_reconnect_is_asked_for_again(
        start_server: Any, redis_server: RedisServer) -> None:
    """After a reconnect the history read of the client's subscribe fails (the channel's
    history key holds something else: Redis answers WRONGTYPE) and the server answers 503.
    The subscription lives on and is asked for again until the read succeeds, instead of
    ending; then it is subscribed and receives."""
    server = start_server("--redis", redis_server.url, "--history-size", "100")
    server.wait_ready()
    history_key = "{fastfan:feed}:history"

    async def test() -> None:
        async with client_of(server, reconnect_base=0.05, reconnect_cap=0.3) as client:
            sub = await client.subscribe("feed", recover=True)
            subscribed: list[dict[str, Any]] = []
            sub.on("subscribed", subscribed.append)
            asked: list[int] = []
            resubscribe = client._resubscribe
            client._resubscribe = lambda s, *again: (  # type: ignore[method-assign]
                asked.append(again[0] if again else 0), resubscribe(s, *again))[1]
            await client.publish("feed", 1)
            assert (await next_of(sub))["data"] == 1
            assert redis_server.command("TYPE", history_key) == b"+stream\r\n"
            redis_server.command("DEL", history_key)
            redis_server.command("SET", history_key, "not a stream")
            kill_and_restart(server)
            async with asyncio.timeout(15):  # reconnected, refused twice, asked again
                while max(asked, default=0) < 2:
                    await asyncio.sleep(0.05)
            assert not sub.ended and not subscribed
            redis_server.command("DEL", history_key)
            async with asyncio.timeout(15):
                while not subscribed:
                    await asyncio.sleep(0.05)
            await client.publish("feed", 2)
            assert (await next_of(sub, timeout=10))["data"] == 2
            assert not sub.ended
    run(test(), timeout=60)


@pytest.mark.slow
def test_recovers_exactly_what_was_published_while_its_server_was_down(
        start_server: Any, redis_server: RedisServer) -> None:
    options = ("--redis", redis_server.url, "--history-size", "100")
    near, far = start_server(*options), start_server(*options)
    near.wait_ready()
    far.wait_ready()

    async def test() -> None:
        failures: list[dict[str, Any]] = []
        async with client_of(near, reconnect_base=0.05, reconnect_cap=0.5) as client, \
                client_of(far, "bob") as publisher:
            sub = await client.subscribe("feed", recover=True)
            sub.on("recovery_failed", failures.append)
            for n in range(3):
                await publisher.publish("feed", n)
            received = [await next_of(sub) for _ in range(3)]
            kill(near)
            for n in range(3, 8):  # while the client's server is away
                await publisher.publish("feed", n)
            restart(near)
            received += [await next_of(sub, timeout=15) for _ in range(5)]
            await publisher.publish("feed", 8)
            received.append(await next_of(sub))
            assert [message["data"] for message in received] == list(range(9))
            assert [message["offset"] for message in received] == list(range(1, 10))
            assert failures == []
            history = await client.history("feed", limit=4)
            assert [m["data"] for m in history["data"]["messages"]] == [5, 6, 7, 8]
    run(test(), timeout=60)


@pytest.mark.slow
def test_a_short_token_refreshed_through_get_token_keeps_the_connection(server: Server) -> None:
    async def test() -> None:
        fetched = 0

        async def get_token() -> str:
            nonlocal fetched
            fetched += 1
            return token("dana", ttl=3)

        closes: list[int] = []
        async with Client(server.url(), get_token=get_token) as client:
            client.on("disconnected", closes.append)
            first = client.welcome
            while fetched < 4:  # past two expiries; the server sweeps every second
                await asyncio.sleep(0.05)
            assert closes == [] and client.welcome is first and client.connected
            assert (await client.stats())["data"]["user"] == "dana"
        assert fetched >= 4  # the connection's, then a refresh before each expiry
    run(test())


def test_the_reconnect_delay_is_full_jitter() -> None:
    drawn = [backoff_delay(attempt, rng=random.Random(7)) for attempt in range(12)]
    expected = [random.Random(7).uniform(0, min(30.0, 0.5 * 2**attempt))
                for attempt in range(12)]
    assert drawn == expected
    rng = random.Random(1)
    delays = [backoff_delay(3, base=0.5, cap=30.0, rng=rng) for _ in range(2000)]
    assert 0 <= min(delays) < 0.1 and 3.9 < max(delays) <= 4.0  # the whole of [0, 0.5 * 2**3]
    assert 1.8 < sum(delays) / len(delays) < 2.2
    assert max(backoff_delay(1000, rng=rng) for _ in range(200)) <= 30.0  # capped


def test_token_expiry_is_read_without_verifying() -> None:
    assert abs(token_expiry(token("eve", ttl=60)) - (time.time() + 60)) < 2  # type: ignore[operator]
    assert token_expiry(token("eve", ttl=None)) is None
    assert token_expiry("not-a-jwt") is None


def test_recovery_asks_from_the_last_offset_and_reports_a_failure() -> None:
    async def test() -> None:
        client = Client("ws://127.0.0.1:1/")
        sub = Subscription(client, "chat.lobby", recover=True, join_leave=True)
        assert sub._request() == {"type": "subscribe", "channel": "chat.lobby",
                                  "joinLeave": True}
        failures: list[dict[str, Any]] = []
        sub.on("recovery_failed", failures.append)
        sub._subscribed({"type": "subscribed", "channel": "chat.lobby", "offset": 4,
                         "epoch": "e1"})
        sub._deliver({"type": "message", "channel": "chat.lobby", "data": 1, "offset": 5,
                      "epoch": "e1"})
        assert sub._request()["recover"] == {"offset": 5, "epoch": "e1"}
        sub._subscribed({"type": "subscribed", "channel": "chat.lobby", "offset": 7,
                         "epoch": "e1", "recovered": True})
        assert (sub.offset, failures) == (5, [])  # 6 and 7 follow from history
        sub._subscribed({"type": "subscribed", "channel": "chat.lobby", "offset": 2,
                         "epoch": "e2", "recovered": False})
        assert (sub.offset, sub.epoch, len(failures)) == (2, "e2", 1)
    run(test())
