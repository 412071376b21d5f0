"""A chat user, as a Python program: `python client.py alice-key` (the session key of a
user; alice-key and bob-key are seeded). The same against either door."""

from __future__ import annotations

import asyncio
import sys

from fastfan.client import Client


async def main(key: str, url: str) -> None:
    async with Client(url, headers={"Cookie": f"chat_session={key}"}) as client:
        print("members:", await client.rpc("members"))
        room = await client.subscribe("room.lobby")
        await client.publish("room.lobby", {"text": "  hello,   heck of a day  "})
        async for message in room:
            print(message["data"])  # {"text": "hello, **** of a day", "by": "Alice"}
            break


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ws://127.0.0.1:8080/"))
