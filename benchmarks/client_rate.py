"""How many messages a second one subscriber takes: fastfan.client (its `async for` and its
`message` callback) against the `websockets` library, the alternative a Python user would
pick, decoding each message with json.loads as such a user would.

Each run is the same: subscribe, then a publisher (a blocking `websockets` client on the
same thread, so the subscriber reads nothing meanwhile) publishes N messages that pile up
at the server, then the subscriber's clock runs from its first read to its Nth message.
So the figure is what the client takes, not what a publisher gives. A tool beside the
suite, not a test:

    .venv/bin/python benchmarks/client_rate.py --messages 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop
import websockets
from lib import LOADGEN_CPU, free_port, start_fastfan
from websockets.sync.client import connect as sync_connect

from fastfan.client import Client

CHANNEL = "bench.rate"
DATA = {"text": "x" * 64, "user": "bench"}


def publish_backlog(url: str, count: int) -> None:
    """`count` messages to CHANNEL, the last acknowledged: all of them are at the server."""
    request = json.dumps({"type": "publish", "channel": CHANNEL, "data": DATA})
    with sync_connect(url, max_size=None) as publisher:
        publisher.recv()  # welcome
        for _ in range(count - 1):
            publisher.send(request)
        publisher.send(json.dumps({"type": "publish", "channel": CHANNEL, "data": DATA,
                                   "id": "last"}))
        while json.loads(publisher.recv()).get("id") != "last":
            pass


async def fastfan_iterating(url: str, count: int) -> float:
    async with Client(url) as client:
        sub = await client.subscribe(CHANNEL)
        publish_backlog(url, count)
        start, received = time.perf_counter(), 0
        async for _ in sub:
            received += 1
            if received == count:
                return count / (time.perf_counter() - start)
    raise RuntimeError("the subscription ended early")


async def fastfan_callback(url: str, count: int) -> float:
    async with Client(url) as client:
        sub = await client.subscribe(CHANNEL)
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        received = 0

        def on_message(message: dict[str, object]) -> None:
            nonlocal received
            received += 1
            if received == count:
                done.set_result(time.perf_counter())

        sub.on("message", on_message)
        publish_backlog(url, count)
        start = time.perf_counter()
        return count / (await done - start)


async def websockets_iterating(url: str, count: int) -> float:
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()  # welcome
        await ws.send(json.dumps({"type": "subscribe", "channel": CHANNEL}))
        await ws.recv()  # subscribed
        publish_backlog(url, count)
        start, received = time.perf_counter(), 0
        async for raw in ws:
            if json.loads(raw)["type"] == "message":
                received += 1
                if received == count:
                    return count / (time.perf_counter() - start)
    raise RuntimeError("the connection ended early")


CLIENTS: dict[str, Callable[[str, int], Coroutine[Any, Any, float]]] = {
    "fastfan.client (async for)": fastfan_iterating,
    "fastfan.client (callback)": fastfan_callback,
    "websockets (async for + json.loads)": websockets_iterating,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="N per client (100000)")
    args = parser.parse_args()
    port = free_port()
    # The server on its CPU (lib.SERVER_CPU), the clients on the other; a backlog of N
    # messages must fit the server's queue for one connection.
    server = start_fastfan(port, ["--max-buffer", str(1 << 30)])
    os.sched_setaffinity(0, {LOADGEN_CPU})
    url = f"ws://127.0.0.1:{port}/"
    try:
        rates = {name: uvloop.run(measure(url, args.messages)) for name, measure in CLIENTS.items()}
    finally:
        server.terminate()
        server.wait()
    baseline = rates["websockets (async for + json.loads)"]
    for name, rate in rates.items():
        print(f"{name:38} {rate:12,.0f} messages/s  {rate / baseline:5.2f}x websockets")


if __name__ == "__main__":
    main()
