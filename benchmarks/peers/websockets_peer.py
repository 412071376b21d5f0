"""The `websockets` library speaking the seed protocol, with its `broadcast`.

Each publish is encoded once and handed to websockets.broadcast, which writes it to every
subscriber (framing per connection). Usage: python websockets_peer.py PORT
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from typing import Any

import websockets
from websockets.asyncio.server import ServerConnection, serve

channels: dict[str, set[ServerConnection]] = {}
ids = itertools.count(1)


async def handle(ws: ServerConnection) -> None:
    client_id = f"websockets-{next(ids)}"
    mine: set[str] = set()
    await ws.send(json.dumps({"type": "welcome", "data": {"clientId": client_id,
                                                          "timestamp": int(time.time() * 1000)}}))
    try:
        async for raw in ws:
            message: dict[str, Any] = json.loads(raw)
            channel = message.get("channel")
            if message.get("type") == "subscribe":
                channels.setdefault(channel, set()).add(ws)
                mine.add(channel)
                await ws.send(json.dumps({"type": "subscribed", "channel": channel}))
            elif message.get("type") == "publish":
                websockets.broadcast(channels.get(channel, ()), json.dumps({
                    "type": "message", "channel": channel, "data": message["data"],
                    "from": client_id, "timestamp": int(time.time() * 1000)}))
    except websockets.ConnectionClosed:
        pass  # the load generator hangs up without a closing handshake
    finally:
        for channel in mine:
            channels[channel].discard(ws)


async def main(port: int) -> None:
    async with serve(handle, "127.0.0.1", port, max_queue=None, compression=None):
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
