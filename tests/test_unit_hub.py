"""The Hub and the Session's rules in one process, against a bus that records what it is
asked: what the core asks of every bus (fastfan.bus.base), without a server process.

Real connections all the same (picows's client and server on loopback in one event loop):
the Session needs a transport, and a fake socket would test the fake."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from fastfan import _picows as picows
from fastfan._core import Hub, Outbox, Session, SlowConsumerPolicy
from fastfan.auth import ALLOW_ALL, ChannelPatterns, Identity
from fastfan.bus.base import DONE, Acknowledger, Bus, BusHealth, Presence, Transitions
from fastfan.directory import Counts
from fastfan.history import HistoryAnswer

TIMEOUT = 5.0


class RecordingBus(Bus):
    """Fans out on the spot, as the one-worker bus does, and remembers every call. With
    `confirms` False its subscriptions wait for the test to call hub.confirm (a bus
    through Redis, before Redis answers)."""

    def __init__(self, hub: Hub, *, confirms: bool = True) -> None:
        self.hub = hub
        self.confirms = confirms
        self.calls: list[tuple[Any, ...]] = []

    def publish(self, channel: str, payload: bytes, ack: Acknowledger | None,
                request_id: bytes, exclude: Outbox | None = None) -> int:
        self.calls.append(("publish", channel, exclude))
        self.hub.fanout(channel, payload, exclude)
        return DONE

    def publish_history(self, channel: str, payload: bytes, ack: Acknowledger | None,
                        request_id: bytes, exclude: Outbox | None = None) -> int:
        raise AssertionError("no channel keeps history here")

    def read_history(self, channel: str, since: int, limit: int,
                     answer: Callable[[HistoryAnswer | None], None]) -> None:
        raise AssertionError("no channel keeps history here")

    def subscribe(self, channel: str) -> bool:
        self.calls.append(("subscribe", channel))
        return not self.confirms

    def unsubscribe(self, channel: str) -> None:
        self.calls.append(("unsubscribe", channel))

    def command(self, payload: bytes, ack: Acknowledger | None) -> int:
        return DONE

    def joined(self, channel: str, client_id: bytes, user: str, info: str,
               metadata: str = "") -> None:
        self.calls.append(("joined", channel, user))

    def left(self, channel: str, client_id: bytes) -> None:
        self.calls.append(("left", channel))

    def gather_presence(self, channel: str, answer: Callable[[Presence | None], None]) -> None:
        answer(self.hub.presence_part(channel, self.hub.presence_limit))

    def gather_channels(self, pattern: str | None, limit: int, local: Counts,
                        answer: Callable[[Counts | None], None]) -> None:
        answer(local)

    async def nodes(self) -> list[dict[str, Any]]:
        return []

    def health(self) -> BusHealth:
        return BusHealth(up=True)

    def watch_transitions(self, listener: Transitions) -> None:
        raise AssertionError("no webhooks here")

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def named(self, kind: str) -> list[tuple[Any, ...]]:
        return [call[1:] for call in self.calls if call[0] == kind]


class Client(picows.WSListener):
    """A real WebSocket client whose messages wait in a queue."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self.transport: picows.WSTransport | None = None

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.TEXT:
            self.messages.put_nowait(json.loads(frame.get_payload_as_utf8_text()))

    def send(self, message: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.send(picows.WSMsgType.TEXT, json.dumps(message).encode())

    async def receive(self) -> Any:
        return await asyncio.wait_for(self.messages.get(), TIMEOUT)

    async def request(self, message: dict[str, Any]) -> Any:
        self.send(message)
        return await self.receive()


class InProcess:
    """A Hub with a RecordingBus behind a picows server on loopback, and its sessions."""

    def __init__(self, *, confirms: bool = True, presence: str = "*") -> None:
        self.loop = asyncio.get_running_loop()
        self.hub = Hub(self.loop, max_message_size=65536, max_subscriptions=100,
                       max_subscription_bytes=65536, max_buffer=1 << 20, publish_rate=1000.0,
                       slow_consumer=SlowConsumerPolicy.DISCONNECT,
                       presence_channels=ChannelPatterns(presence.split(",")),
                       presence_limit=100)
        self.bus = RecordingBus(self.hub, confirms=confirms)
        self.hub.bus = self.bus
        self.sessions: list[Session] = []
        self.server: asyncio.Server | None = None

    def _session(self, request: picows.WSUpgradeRequest) -> Session:
        user = request.path.decode().partition("?user=")[2] or "anonymous"
        session = Session(self.hub, Identity(user, ALLOW_ALL, ALLOW_ALL, None))
        self.sessions.append(session)
        return session

    async def connect(self, user: str = "alice") -> Client:
        if self.server is None:
            self.server = await picows.ws_create_server(self._session, "127.0.0.1", 0,
                                                        enable_auto_pong=False)
        port = self.server.sockets[0].getsockname()[1]
        _, client = await picows.ws_connect(Client, f"ws://127.0.0.1:{port}/?user={user}")
        assert isinstance(client, Client)
        assert (await client.receive())["type"] == "welcome"
        return client

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def in_process(test: Callable[[InProcess], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        world = InProcess(**options)
        try:
            await test(world)
        finally:
            world.close()

    uvloop.run(main())


def test_a_publish_without_echo_names_its_publisher_for_the_bus_to_leave_out() -> None:
    async def test(world: InProcess) -> None:
        publisher, other = await world.connect(), await world.connect("bob")
        for client in (publisher, other):
            assert (await client.request({"type": "subscribe", "channel": "chat"}))[
                "type"] == "subscribed"
        publisher.send({"type": "publish", "channel": "chat", "data": "quiet", "echo": False})
        publisher.send({"type": "publish", "channel": "chat", "data": "loud"})
        assert (await publisher.receive())["data"] == "loud"
        assert [(await other.receive())["data"] for _ in range(2)] == ["quiet", "loud"]
        quiet, loud = [call for call in world.bus.named("publish") if call[0] == "chat"]
        assert quiet == ("chat", world.sessions[0]) and loud == ("chat", None)

    in_process(test)


def test_the_bus_hears_of_a_channel_once_and_subscribed_waits_for_its_confirmation() -> None:
    async def test(world: InProcess) -> None:
        first, second = await world.connect(), await world.connect("bob")
        first.send({"type": "subscribe", "channel": "news", "id": 1})
        second.send({"type": "subscribe", "channel": "news", "id": 2})
        # Replies keep the requests' order: a pong before `subscribed` means it is held.
        assert await first.request({"type": "ping", "id": 9}) == {"type": "pong", "id": 9}
        assert await second.request({"type": "ping", "id": 9}) == {"type": "pong", "id": 9}
        world.hub.confirm("news")
        assert await first.receive() == {"type": "subscribed", "channel": "news", "id": 1}
        assert await second.receive() == {"type": "subscribed", "channel": "news", "id": 2}
        assert world.bus.named("subscribe") == [("news",)]
        for client in (first, second):
            assert (await client.request({"type": "unsubscribe", "channel": "news"}))[
                "type"] == "unsubscribed"
        assert world.bus.named("unsubscribe") == [("news",)]  # with the last one only

    in_process(test, confirms=False)


def test_presence_channels_tell_the_bus_who_joined_and_left() -> None:
    async def test(world: InProcess) -> None:
        client = await world.connect("carol")
        for channel in ("room", "feed"):
            await client.request({"type": "subscribe", "channel": channel})
            await client.request({"type": "unsubscribe", "channel": channel})
        assert world.bus.named("joined") == [("room", "carol")]
        assert world.bus.named("left") == [("room",)]

    in_process(test, presence="room")


def test_a_watcher_is_left_out_of_its_own_join_and_sees_the_others() -> None:
    async def test(world: InProcess) -> None:
        watcher, other = await world.connect(), await world.connect("bob")
        assert (await watcher.request({"type": "subscribe", "channel": "room",
                                       "joinLeave": True}))["type"] == "subscribed"
        await other.request({"type": "subscribe", "channel": "room"})
        event = await watcher.receive()
        assert (event["type"], event["data"]["user"]) == ("join", "bob")
        own_join = world.bus.named("publish")[0]
        assert own_join == ("#room", world.sessions[0])

    in_process(test)
