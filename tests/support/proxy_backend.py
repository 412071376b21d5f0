"""A backend for fastfan's HTTP proxies, written the way Centrifugo's proxy documentation
describes one (centrifugal.dev, "Proxy events to the backend"): a POST of JSON per event,
answered with {"result":…}, {"error":{"code","message"}} or {"disconnect":{"code","reason"}}.
It runs aiohttp.web in a thread of the test process and keeps every request it got.

Its decisions: the user is the `session` cookie (none: error 401); `banned` is disconnected,
`odd` gets an error code outside HTTP's. Connect subscribes the user to inbox.USER and
gives it an `info`; `brief` and `stale-*` expire in 2 s. Refresh extends by 2 s unless the
user is in `expired`. Only `boss` may subscribe to secret.*. A publish needs {"text": …};
it goes out as {"text", "by": USER}, out of history on quiet.*. RPC `whoami` answers who
asks; `sum` adds numbers.

A fault on demand: the channel (subscribe, publish) or the method (rpc) `fault.KIND`, the
user `fault-KIND` (connect) or `stale-KIND` (refresh): `500`, `garbage` (200, not JSON),
`empty` (200, no body), `hangup` (closes without answering), `mute` (answers nothing),
`trickle` (one byte a second), `disconnect` ({"disconnect":{"code":4503,…}}).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from support.wire import free_port

FAULTS = ("500", "garbage", "empty", "hangup", "mute", "trickle", "disconnect")


class ProxyBackend:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[tuple[str, CIMultiDict[str], dict[str, Any]]] = []
        self.expired: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the proxy backend did not start")

    def options(self, *kinds: str) -> list[str]:
        """fastfan's options for the proxies `kinds` (all five by default) to this backend."""
        kinds = kinds or ("connect", "refresh", "subscribe", "publish", "rpc")
        return [arg for kind in kinds for arg in (f"--proxy-{kind}", f"{self.url}/{kind}")]

    def received(self, kind: str) -> list[tuple[CIMultiDict[str], dict[str, Any]]]:
        """(headers, body) of each request the `kind` proxy got, in order."""
        return [(headers, body) for path, headers, body in list(self.requests)
                if path == f"/{kind}"]

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        for kind in ("connect", "refresh", "subscribe", "publish", "rpc"):
            app.router.add_post(f"/{kind}", self._handler(kind))
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def _handler(self, kind: str) -> Any:
        decide = getattr(self, f"_{kind}")

        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.requests.append((request.path, CIMultiDict(request.headers), body))
            fault = _fault_named(kind, body, request)
            if fault is not None:
                return await _faulty(fault, request)
            return web.json_response(decide(body, request))
        return handle

    # The decisions, as a Centrifugo backend would take them ---------------------------------

    def _connect(self, body: dict[str, Any], request: web.Request) -> dict[str, Any]:
        user = request.cookies.get("session")
        if user is None:
            return {"error": {"code": 401, "message": "no session"}}
        if user == "banned":
            return {"disconnect": {"code": 4501, "reason": "banned"}}
        if user == "odd":
            return {"error": {"code": 1000, "message": "odd one"}}
        result: dict[str, Any] = {"user": user, "info": {"name": user.title()},
                                  "channels": [f"inbox.{user}"]}
        if user == "brief" or user.startswith("stale-"):
            result["expire_at"] = int(time.time()) + 2
        return {"result": result}

    def _refresh(self, body: dict[str, Any], request: web.Request) -> dict[str, Any]:
        if body["user"] in self.expired:
            return {"result": {"expired": True}}
        return {"result": {"expire_at": int(time.time()) + 2}}

    def _subscribe(self, body: dict[str, Any], request: web.Request) -> dict[str, Any]:
        if body["channel"].startswith("secret.") and body["user"] != "boss":
            return {"error": {"code": 403, "message": "members only"}}
        return {"result": {}}

    def _publish(self, body: dict[str, Any], request: web.Request) -> dict[str, Any]:
        data = body.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            return {"error": {"code": 400, "message": "a message needs text"}}
        result: dict[str, Any] = {"data": {"text": data["text"], "by": body["user"]}}
        if body["channel"].startswith("quiet."):
            result["skip_history"] = True
        return {"result": result}

    def _rpc(self, body: dict[str, Any], request: web.Request) -> dict[str, Any]:
        if body["method"] == "whoami":
            return {"result": {"data": {"user": body["user"], "client": body["client"]}}}
        if body["method"] == "sum":
            return {"result": {"data": sum(body["data"])}}
        return {"error": {"code": 404, "message": f"no method {body['method']}"}}


def _fault_named(kind: str, body: dict[str, Any], request: web.Request) -> str | None:
    if kind == "connect":
        name, prefix = request.cookies.get("session", ""), "fault-"
    elif kind == "refresh":
        name, prefix = body["user"], "stale-"
    else:
        name = body["channel"] if kind in ("subscribe", "publish") else body["method"]
        prefix = "fault."
    if name.startswith(prefix) and name[len(prefix):] in FAULTS:
        return name[len(prefix):]
    return None


async def _faulty(fault: str, request: web.Request) -> web.StreamResponse:
    if fault == "500":
        return web.Response(status=500, text="backend down")
    if fault == "garbage":
        return web.Response(status=200, text="<html>not json", content_type="text/html")
    if fault == "empty":
        return web.Response(status=200)
    if fault == "disconnect":
        return web.json_response({"disconnect": {"code": 4503, "reason": "go away"}})
    if fault == "hangup":
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(1)
        return web.Response()
    if fault == "mute":
        await asyncio.sleep(30)
        return web.Response()
    # trickle: a whole, valid answer, one byte a second
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(answer := json.dumps({"result": {}}).encode())
    await response.prepare(request)
    for byte in answer:
        await response.write(bytes([byte]))
        await asyncio.sleep(1)
    return response
