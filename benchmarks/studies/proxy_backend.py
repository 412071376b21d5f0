"""A backend for the proxies' figures, written to Centrifugo's proxy documentation and
answering at once: connect lets everyone in as one user, publish allows every message.
Run as its own process (`python -m studies.proxy_backend PORT`), so that its CPU is not
the server's."""

from __future__ import annotations

import sys

from aiohttp import web


async def connect(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"result": {"user": "bench"}})


async def publish(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"result": {}})


def main() -> None:
    app = web.Application()
    app.add_routes([web.post("/connect", connect), web.post("/publish", publish)])
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None,
                access_log=None)


if __name__ == "__main__":
    main()
