"""GET /status and /status.json on the API port: the key rule, the figures, the page."""

from __future__ import annotations

import base64
import http.client
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from browser import CHROMIUM, Browser
from support.api import KEY, request, start_api, status_json
from support.redis import RedisServer
from support.server import Server, messages_of, token
from support.waiting import wait_for
from websockets.sync.client import ClientConnection, connect

from fastfan import status
from fastfan.metrics import FIGURES, WRITTEN_AT, SharedFigures

LOOPBACK = ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"]
ELSEWHERE = ["10.0.0.5", "192.168.1.20", "8.8.8.8", "::ffff:10.0.0.1", "2001:db8::1",
             "fe80::1%eth0", "", "not an address", None]


def subscriber(clients: ExitStack, server: Server, channel: str) -> ClientConnection:
    """A subscriber to `channel` that queues what it does not read, however much: closing it
    does not wait behind a flood it never read."""
    client = clients.enter_context(connect(server.url(token=token()), max_queue=None))
    messages_of(client, 1)  # welcome
    client.send(json.dumps({"type": "subscribe", "channel": channel}))
    assert messages_of(client, 1)[0]["type"] == "subscribed"
    return client


def total(document: dict[str, Any], name: str) -> float:
    return float(sum(row[name] for row in [*document["workers"], document["master"]]))


# The key rule -----------------------------------------------------------------------------

@pytest.mark.parametrize("peer", LOOPBACK)
def test_localhost_needs_no_key_but_a_key_it_gives_must_be_right(peer: str) -> None:
    assert status.may_view(peer, None, b"k" * 20)
    assert status.may_view(peer, b"k" * 20, b"k" * 20)
    assert not status.may_view(peer, b"wrong", b"k" * 20)
    assert not status.may_view(peer, b"", b"k" * 20)


@pytest.mark.parametrize("peer", ELSEWHERE)
def test_anyone_else_needs_the_right_key(peer: str | None) -> None:
    assert not status.may_view(peer, None, b"k" * 20)
    assert not status.may_view(peer, b"wrong", b"k" * 20)
    assert status.may_view(peer, b"k" * 20, b"k" * 20)


def test_the_key_comes_in_the_header_or_the_query() -> None:
    header = {b"authorization": b"apikey  s3cret "}
    assert status.presented_key(header, b"") == b"s3cret"
    assert status.presented_key({b"authorization": b"ApiKey s3cret"}, b"") == b"s3cret"
    assert status.presented_key(header, b"key=other") == b"s3cret"  # the header wins
    assert status.presented_key({b"authorization": b"Bearer s3cret"}, b"") == b""
    assert status.presented_key({}, b"key=s%2Fcr%C3%A9t&x=1") == "s/crét".encode()
    assert status.presented_key({}, b"key=") == b""
    assert status.presented_key({}, b"x=1") is None
    assert status.presented_key({}, b"") is None


def test_each_row_says_when_it_was_written() -> None:
    shared = SharedFigures(2)
    before = time.time()
    shared.write(1, {"deliveries_total": 5})
    rows = shared.each()
    assert len(rows) == 3 and rows[1]["deliveries_total"] == 5
    assert before <= rows[1][WRITTEN_AT] <= time.time() and rows[0][WRITTEN_AT] == 0
    assert WRITTEN_AT not in shared.read(1) and WRITTEN_AT not in shared.total()


def test_busiest_channels_most_first_ties_by_name() -> None:
    channels = {"b": 3, "a": 3, "c": 7, "empty": 0, "d": 1}
    assert status.busiest(channels, 3) == [("c", 7), ("a", 3), ("b", 3)]
    assert status.busiest({}, 3) == []


def test_the_page_runs_only_its_own_script() -> None:
    policy = dict(status.PAGE_HEADERS)[b"Content-Security-Policy"].decode()
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert policy.count("'sha256-") == 2  # one script, one style: nothing else runs
    assert b"innerHTML" not in status.PAGE and b"http" not in status.PAGE.replace(
        b"http://www.w3.org/2000/svg", b"")  # nothing fetched from elsewhere


# The routes, end to end -------------------------------------------------------------------

@pytest.mark.slow
def test_status_and_its_json_answer_on_the_api_port_with_the_key_rule(
        start_server: Any) -> None:
    server, port = start_api(start_server)
    code, headers, body = request("127.0.0.1", port, "GET", "/status")
    assert code == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert b"<title>fastfan status</title>" in body
    status_json(port)  # from localhost, no key
    status_json(port, f"?key={KEY}")
    status_json(port, headers={"Authorization": f"apikey {KEY}"})
    for path, headers in (("/status?key=wrong", {}), ("/status.json?key=wrong", {}),
                          ("/status.json", {"Authorization": "apikey wrong"}),
                          ("/status.json", {"Authorization": f"Bearer {KEY}"})):
        code, _, body = request("127.0.0.1", port, "GET", path, headers=headers)
        assert code == 401, path
        assert "API key" in json.loads(body)["error"]["message"]
    code, headers, _ = request("127.0.0.1", port, "POST", "/status.json", b"{}")
    assert (code, headers["Allow"]) == (405, "GET, HEAD")
    assert server.get("/status")[0] == 404  # not on the public port
    assert KEY not in server.log()


@pytest.mark.slow
def test_the_figures_follow_connections_and_messages(
        start_server: Any, clients: ExitStack) -> None:
    server, port = start_api(start_server)
    first = status_json(port)
    assert [set(row) for row in first["workers"]] == [
        {k for k in FIGURES if not k.startswith("latency_")} | {"latency_buckets", "written_at"}]
    assert abs(first["workers"][0]["written_at"] - time.time()) < 5
    assert len(first["latency_bounds"]) + 1 == len(first["master"]["latency_buckets"])
    assert first["redis"] is False and first["worker"] == 0
    assert total(first, "connections") == 0
    for channel in ("room.1", "room.1", "room.2"):
        subscriber(clients, server, channel)
    with server.websocket("bob") as publisher:
        for n in range(5):
            publisher.send(json.dumps({"type": "publish", "channel": "room.1", "data": n}))
        after = wait_for(lambda: (d := status_json(port)) and total(d, "deliveries_total") >= 10
                         and d)
        assert total(after, "connections") == 4
    assert total(after, "messages_received_total") - total(first, "messages_received_total") >= 7
    assert sum(after["workers"][0]["latency_buckets"]) >= 5  # one per publish fanned out
    assert after["channels"] == [{"channel": "room.1", "subscribers": 2},
                                 {"channel": "room.2", "subscribers": 1}]
    assert after["time"] > first["time"] and after["uptime"] >= 0


@pytest.mark.slow
def test_one_row_per_worker(start_server: Any, clients: ExitStack) -> None:
    server, port = start_api(start_server, "--workers", "2")
    for n in range(8):
        subscriber(clients, server, f"room.{n}")
    document = wait_for(lambda: (d := status_json(port)) and total(d, "connections") == 8 and d)
    assert len(document["workers"]) == 2
    assert document["worker"] in (0, 1)
    assert sum(row["subscriptions"] for row in document["workers"]) == 8


@pytest.mark.slow
def test_redis_state(start_server: Any, redis_server: RedisServer) -> None:
    server, port = start_api(start_server, "--redis", redis_server.url)
    server.wait_ready()
    document = wait_for(lambda: (d := status_json(port))["workers"][0]["redis_up"] == 1 and d)
    assert document["redis"] is True
    redis_server.kill()
    wait_for(lambda: status_json(port)["workers"][0]["redis_up"] == 0)


# The page in a browser --------------------------------------------------------------------

class Texts(HTMLParser):
    """The text of every element with an id, the rows of each tbody with an id, and the
    points of the polyline inside each element with an id."""

    VOID = frozenset({"meta", "link", "br", "hr", "img", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.rows: dict[str, list[list[str]]] = {}
        self.points: dict[str, str] = {}
        self._open: list[tuple[str, str]] = []  # (tag, id or "")

    def _ids(self) -> list[str]:
        return [name for _, name in self._open if name]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        name = dict(attrs).get("id") or ""
        if tag not in self.VOID:
            self._open.append((tag, name))
        if name:
            self.text[name] = ""
        ids = self._ids()
        if tag == "tbody":
            self.rows[name] = []
        elif tag == "tr" and ids and ids[-1] in self.rows:
            self.rows[ids[-1]].append([])
        elif tag == "td" and ids and ids[-1] in self.rows:
            self.rows[ids[-1]][-1].append("")
        elif tag == "polyline" and ids:
            self.points[ids[-1]] = dict(attrs).get("points") or ""

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][0] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        ids = self._ids()
        for name in ids:
            self.text[name] += data
        if ids and ids[-1] in self.rows and self._open[-1][0] == "td":
            self.rows[ids[-1]][-1][-1] += data


@contextmanager
def publishing(port: int, channel: str) -> Iterator[None]:
    """Publishes to `channel` through the API, as fast as one connection goes, meanwhile."""
    stop = threading.Event()

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while not stop.is_set():
            request("127.0.0.1", port, "POST", "/api/publish",
                    json.dumps({"channel": channel, "data": "x"}).encode(),
                    {"Authorization": f"apikey {KEY}"}, conn)
        conn.close()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (./dev test installs it)")
@pytest.mark.slow
def test_the_page_in_headless_chromium(
        start_server: Any, clients: ExitStack, tmp_path: Path) -> None:
    server, port = start_api(start_server)
    for channel in ("news", "news", "news", "sports"):
        subscriber(clients, server, channel)
    out_rate = "(document.getElementById('out-rate') || {}).textContent || ''"
    with publishing(port, "news"), Browser.showing(f"http://127.0.0.1:{port}/status") as browser:
        wait_for(lambda: re.fullmatch(r"[\d,.]+", browser.evaluate(out_rate))
                 and float(browser.evaluate(out_rate).replace(",", "")) > 0, timeout=20)
        dom = browser.evaluate("document.documentElement.outerHTML")
        png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    (tmp_path / "status.png").write_bytes(png)
    page = Texts()
    page.feed(dom)
    assert page.text["state"].startswith("updated"), page.text["state"]
    assert page.text["connections"] == "4"
    assert page.text["worker"] == "0"
    assert page.text["redis"] == "not used"
    assert re.fullmatch(r"[\d.]+ ms", page.text["p99"]), page.text["p99"]
    workers = page.rows["workers"]
    assert len(workers) == 1 and workers[0][:4] == ["0", "4", "4", "2"]
    assert re.fullmatch(r"[\d,.]+", workers[0][5]) and workers[0][5] != "0"  # out / s
    assert page.rows["channels"] == [["news", "3"], ["sports", "1"]]
    assert page.text["channels-scope"] == "on every worker and node, by subscribers"
    assert len(page.points["plot-out"].split()) >= 2  # a point a second
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
