"""The same chat behind fastfan's HTTP proxies: a small aiohttp backend written to
Centrifugo's proxy documentation (each event a POST of JSON; the answer {"result": ...},
{"error": {"code", "message"}} or {"disconnect": {"code", "reason"}}).

    python backend.py --port 3000
    fastfan run --proxy-connect http://127.0.0.1:3000/connect \\
        --proxy-subscribe http://127.0.0.1:3000/subscribe \\
        --proxy-publish http://127.0.0.1:3000/publish --proxy-rpc http://127.0.0.1:3000/rpc
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from chat import Chat, ChatError

chat = Chat()
Decide = Callable[[dict[str, Any], web.Request], dict[str, Any]]


def answer(decide: Decide) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A proxy endpoint: the decision's result, or the error it refused with."""
    async def endpoint(request: web.Request) -> web.Response:
        try:
            result = decide(await request.json(), request)
        except ChatError as refused:
            return web.json_response({"error": {"code": refused.code,
                                                "message": refused.message}})
        return web.json_response({"result": result})
    return endpoint


def connect(body: dict[str, Any], request: web.Request) -> dict[str, Any]:
    # The client's Cookie header reaches here: fastfan forwards it (--proxy-headers).
    user = chat.who(request.headers.get("Cookie"))
    return {"user": user.name, "info": {"name": user.display},
            "channels": [f"inbox.{user.name}"]}


def subscribe(body: dict[str, Any], request: web.Request) -> dict[str, Any]:
    chat.may_subscribe(chat.user(body["user"]), body["channel"])
    return {}


def publish(body: dict[str, Any], request: web.Request) -> dict[str, Any]:
    return {"data": chat.message(chat.user(body["user"]), body.get("data"))}


def rpc(body: dict[str, Any], request: web.Request) -> dict[str, Any]:
    if body.get("method") == "members":
        return {"data": chat.members()}
    raise ChatError(404, f"unknown method {body.get('method')!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    app = web.Application()
    for path, decide in (("/connect", connect), ("/subscribe", subscribe),
                         ("/publish", publish), ("/rpc", rpc)):
        app.router.add_post(path, answer(decide))
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
