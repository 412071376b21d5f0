"""What a client says and hears, as the tests check it: publishes answered, subscriptions
with their position, history's offsets, one order for all, a drop and its recovery."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from support.server import Server
from support.waiting import collect, wait_for
from support.wire import CLOSE, RawClient

HISTORY = ("--history-size", "2000")
CLOSED_BY_API = 4000


def publish(client: RawClient, channel: str, data: Any, request_id: Any) -> dict[str, Any]:
    """A publish with an id, and its answer."""
    client.publish(channel, data, id=request_id)
    return dict(client.recv_json())


def ask(client: RawClient, request: dict[str, Any]) -> dict[str, Any]:
    """Send `request` with an id; its reply (the messages that come before it skipped:
    another's publish, an application's hello)."""
    client.send_json({**request, "id": 7})
    while (reply := client.recv_json()).get("id") != 7:
        pass
    return dict(reply)


def subscribe(client: RawClient, channel: str, **options: Any) -> dict[str, Any]:
    """A subscribe (with `options`: recover, joinLeave, id...), and its `subscribed`."""
    client.send_json({"type": "subscribe", "channel": channel, **options})
    reply = client.recv_json()
    assert reply["type"] == "subscribed", reply
    return dict(reply)


def assert_delivered_but_not_kept(publisher: RawClient, subscriber: RawClient, channel: str,
                                  data: Any) -> None:
    """A publish on `channel` (history kept) that reaches `subscriber`, without an offset,
    and that neither a history read nor a recovery from before it gives."""
    before = ask(subscriber, {"type": "subscribe", "channel": channel})
    assert before["offset"] == 0
    assert ask(publisher, {"type": "publish", "channel": channel, "data": data})[
        "type"] == "published"
    delivered = subscriber.recv_json()
    assert delivered["data"] == data and "offset" not in delivered, delivered
    assert ask(publisher, {"type": "history", "channel": channel})["data"]["messages"] == []
    assert ask(subscriber, {"type": "unsubscribe", "channel": channel})["type"] == "unsubscribed"
    recovered = ask(subscriber, {"type": "subscribe", "channel": channel, "recover": {
        "offset": before["offset"], "epoch": before["epoch"]}})
    assert (recovered["offset"], recovered["recovered"]) == (0, True), recovered
    assert collect(subscriber, quiet=0.3) == []


def offsets(messages: list[dict[str, Any]]) -> list[int]:
    return [message["offset"] for message in messages if message["type"] == "message"]


def each_reaches_every_listener(publisher: RawClient, listeners: list[RawClient],
                                names: list[str]) -> None:
    """A publish to each channel in `names` (its name as data), acknowledged, and every
    listener receives them in that order."""
    for name in names:
        assert publish(publisher, name, name, name)["type"] == "published"
    for listener in listeners:
        assert [listener.recv_json()["data"] for _ in names] == names


def closed_by_api(client: RawClient) -> None:
    """The server's CLOSE is 4000 with its reason; answered, as a browser does."""
    code, reason = client.recv_close()
    assert (code, reason) == (CLOSED_BY_API, "disconnected by the server")
    client.send_frame(CLOSE, payload=code.to_bytes(2, "big"))


def alive(client: RawClient) -> bool:
    """Answers a ping with a pong (after whatever was queued before it)."""
    client.send_json({"type": "ping"})
    while client.recv_json()["type"] != "pong":
        pass
    return True


class Publisher(threading.Thread):
    """Publishes 0, 1, 2... to a channel, one every `interval` seconds, until stopped."""

    def __init__(self, client: RawClient, channel: str, interval: float = 0.001) -> None:
        super().__init__(daemon=True)
        self.client, self.channel, self.interval = client, channel, interval
        self.count = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.client.publish(self.channel, self.count)
            self.count += 1
            time.sleep(self.interval)

    def stop(self) -> int:
        self.stopping.set()
        self.join()
        return self.count

    def wait_for_more(self, count: int) -> None:
        """Until it has sent `count` more publishes than it had."""
        mark = self.count
        wait_for(lambda: self.count >= mark + count)


def interleaved(publishers: list[RawClient], subscribers: list[RawClient], channel: str,
                count: int) -> None:
    """Publishers on different workers or nodes take turns; every subscriber receives the
    same sequence, numbered 1..N without a gap."""
    for subscriber in subscribers:
        subscribe(subscriber, channel)
    for n in range(count):
        for index, publisher in enumerate(publishers):
            publisher.publish(channel, [index, n])
    expected = count * len(publishers)
    sequences = []
    for subscriber in subscribers:
        received = [subscriber.recv_json() for _ in range(expected)]
        assert offsets(received) == list(range(1, expected + 1))
        assert len({message["epoch"] for message in received}) == 1
        sequences.append([(message["offset"], message["data"]) for message in received])
        for index in range(len(publishers)):  # each publisher's order is kept too
            mine = [data[1] for _, data in sequences[-1] if data[0] == index]
            assert mine == list(range(count))
    assert all(sequence == sequences[0] for sequence in sequences)


def drop_and_recover(publishing: Server, first: RawClient,
                     reconnect: Callable[[], RawClient]) -> None:
    """A subscriber drops without a word while publishes go on, then comes back (through
    `reconnect()`) recovering: it gets every message after the last it had, once each, in
    order, then the live ones, while the publisher never pauses."""
    channel = "ticks"
    reply = subscribe(first, channel)
    publisher = Publisher(publishing.connect("pub"), channel)
    publisher.start()
    try:
        seen = [first.recv_json() for _ in range(100)]
        first.sock.close()  # abrupt: no CLOSE, the server finds out later
        last = seen[-1]["offset"]
        assert offsets(seen) == list(range(reply["offset"] + 1, last + 1))
        publisher.wait_for_more(100)  # publishes meanwhile
        again = reconnect()
        resumed = subscribe(again, channel, recover={"offset": last, "epoch": reply["epoch"]})
        assert resumed["recovered"] is True and resumed["epoch"] == reply["epoch"]
        assert resumed["offset"] > last  # it missed some: the test covers a seam
        publisher.wait_for_more(100)  # live ones after the seam
    finally:
        total = publisher.stop()
    received = collect(again)
    assert offsets(received) == list(range(last + 1, total + 1))
    assert [message["data"] for message in received] == list(range(last, total))
