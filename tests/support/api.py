"""The server API (--api-port, --api-key) as a test calls it: a server with it, a call and
its answer, and what `channels`, `info` and /status.json tell."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from support.server import Server
from support.waiting import wait_for
from support.wire import RawClient, free_port
from support.workers import every, place

KEY = "api-key-for-tests-0123456789"
AUTH = {"Authorization": f"apikey {KEY}"}


def start_api(start_server: Any, *args: str, **kwargs: Any) -> tuple[Server, int]:
    """A server with the API on a free port, once that port answers too."""
    api_port = free_port()
    server = start_server("--api-port", str(api_port), "--api-key", KEY, *args, **kwargs)
    wait_for(lambda: answers(server.host, api_port))
    return server, api_port


def answers(host: str, port: int) -> bool:
    try:
        return request(host, port, "GET", "/health")[0] == 200
    except OSError:
        return False


def request(host: str, port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None,
            conn: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request; on `conn` (kept open) when given, else on a connection of its own."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        if own:
            conn.close()


def call(port: int, method: str, body: Any = None, *, raw: bytes | None = None,
         headers: dict[str, str] | None = None,
         conn: http.client.HTTPConnection | None = None) -> tuple[int, Any]:
    """POST /api/METHOD with the key (unless `headers` says otherwise); status and JSON."""
    data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
    status, _, answer = request("127.0.0.1", port, "POST", f"/api/{method}", data,
                                AUTH if headers is None else headers, conn)
    return status, json.loads(answer)


def assert_error(answer: Any, code: int, *words: str) -> None:
    assert set(answer) == {"error"}
    assert answer["error"]["code"] == code
    message = answer["error"]["message"]
    assert "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message


def channels(port: int, pattern: str | None = None) -> dict[str, int]:
    """`channels`: channel -> subscribers."""
    status, answer = call(port, "channels", {} if pattern is None else {"pattern": pattern})
    assert status == 200, answer
    return {name: entry["subscribers"] for name, entry in answer["result"]["channels"].items()}


def nodes(port: int) -> dict[str, dict[str, Any]]:
    """`info`: node name -> what it says of that node."""
    status, answer = call(port, "info")
    assert status == 200, answer
    return {node.pop("name"): node for node in answer["result"]["nodes"]}


def name_of(server: Server) -> str:
    """The name `info` gives a node."""
    return f"{socket.gethostname()}:{server.port}"


def status_json(port: int, query: str = "", headers: dict[str, str] | None = None
                ) -> dict[str, Any]:
    code, answer_headers, body = request("127.0.0.1", port, "GET", "/status.json" + query,
                                         headers=headers)
    assert code == 200, body
    assert answer_headers["Content-Type"] == "application/json"
    assert answer_headers["Cache-Control"] == "no-store"
    return json.loads(body)  # type: ignore[no-any-return]


def two_nodes_add_up(start_server: Any, redis_url: str) -> tuple[Server, int, Server, int,
                                                                  RawClient]:
    """A node with the API and one worker, another with two, on `redis_url`, with
    subscribers on both: `channels` and `info` at the first count both. Returns the first
    node, its API port, the other node, how many clients that one holds, and the first's
    client."""
    near, port = start_api(start_server, "--redis", redis_url)
    far = start_server("--redis", redis_url, "--workers", "2")
    near.wait_ready()
    far.wait_ready()
    alice = near.connect("alice").subscribe("room")
    placed = place(far, 1, "bob", ("room", "far.only"))
    far_count = len(every(placed))
    wait_for(lambda: len(nodes(port)) == 2, timeout=5)  # far's workers have announced
    assert channels(port) == {"room": far_count + 1, "far.only": far_count}
    assert channels(port, "far.*") == {"far.only": far_count}
    described = wait_for(lambda: (n := nodes(port)) and n[name_of(far)]["connections"]
                         == far_count and n, timeout=5)
    assert described == {
        name_of(near): {"workers": 1, "connections": 1, "subscriptions": 1,
                        "uptime": described[name_of(near)]["uptime"]},
        name_of(far): {"workers": 2, "connections": far_count,
                       "subscriptions": 2 * far_count,
                       "uptime": described[name_of(far)]["uptime"]}}
    return near, port, far, far_count, alice
