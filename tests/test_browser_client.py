"""GET /fastfan.js, the browser client: served by fastfan, imported by a page in headless
Chromium and Firefox from another origin, and driven against real `fastfan run` processes; its
bookkeeping (ids, recovery, timeouts, pings, backoff) under Node with a stand-in WebSocket."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from browser import CHROMIUM, FIREFOX, Browser, Firefox
from support.redis import RedisServer
from support.server import Server, kill, kill_and_restart, messages_of, restart, token
from support.waiting import wait_for

pytestmark = pytest.mark.slow  # real browsers, and Node

SCRIPT = Path(__file__).parent.parent / "fastfan" / "fastfan.js"
NODE = "node"
node_only = pytest.mark.skipif(shutil.which(NODE) is None, reason="node is not on PATH")
TSC = Path(__file__).parent / "js" / "node_modules" / ".bin" / "tsc"

Page = Browser | Firefox


def test_the_script_is_served_to_any_origin(server: Server) -> None:
    status, raw_headers, body = server.get("/fastfan.js?v=1")
    headers = {name.lower(): value for name, value in raw_headers.items()}
    assert status == 200
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["access-control-allow-origin"] == "*"
    assert body == SCRIPT.read_bytes()


@node_only
def test_the_module_parses_and_exports_the_surface(tmp_path: Path) -> None:
    module = tmp_path / "fastfan.mjs"  # .mjs: Node 20 reads a bare .js as CommonJS
    shutil.copy(SCRIPT, module)
    result = subprocess.run(
        [NODE, "--input-type=module", "-e",
         f"const m = await import({json.dumps(module.as_uri())}); "
         "console.log(JSON.stringify(Object.keys(m).sort()))"],
        capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(result.stdout) == ["CHANNEL_NAME", "Client", "MAX_MESSAGE_SIZE",
                                         "ServerError", "Subscription", "backoffDelay",
                                         "tokenExpiry"]


@pytest.mark.skipif(not TSC.exists(),
                    reason="TypeScript is not in tests/js (./dev test installs it)")
def test_the_jsdoc_types_hold_under_typescript_strict() -> None:
    result = subprocess.run(
        [str(TSC), "--allowJs", "--checkJs", "--noEmit", "--strict", "--target", "es2022",
         "--module", "es2022", "--lib", "es2022,dom", str(SCRIPT)],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# In headless Chromium and Firefox --------------------------------------------------------


@pytest.fixture(params=["chromium", "firefox"])
def page(server: Server, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A blank page (another origin than fastfan's) that has imported /fastfan.js as `ff`,
    with `log`, a list the page's callbacks append to; in Chromium, and in Firefox."""
    browsers: dict[str, tuple[str | None, Any]] = {"chromium": (CHROMIUM, Browser),
                                                   "firefox": (FIREFOX, Firefox)}
    program, kind = browsers[request.param]
    if program is None:
        pytest.skip(f"{request.param} is not on PATH (./dev test installs it: Debian's "
                    f"{'firefox-esr' if request.param == 'firefox' else 'chromium'})")
    with kind.showing("about:blank") as browser:
        script = f"http://{server.host}:{server.port}/fastfan.js"
        browser.evaluate(f"import({json.dumps(script)}).then((ff) => {{ window.ff = ff; "
                         "window.log = []; return true })")
        yield browser


def run(page: Page, body: str, timeout: float = 30) -> Any:
    """`body`, the inside of an async function, run in the page; what it returns."""
    return page.evaluate(f"(async () => {{ {body} }})()", timeout=timeout)


def events(page: Page, kind: str) -> list[Any]:
    return [args for name, args in page.evaluate("window.log") if name == kind]


def connect(page: Page, server: Server, options: str, **settings: Any) -> None:
    """`window.client`, connected, its events and `window.sub`'s logged as [name, args]."""
    run(page, f"""
        const client = window.client = new ff.Client({json.dumps(server.url())}, {options})
        for (const name of ['connected', 'disconnected', 'error']) {{
          client.on(name, (arg) => log.push([name, name === 'error' ? String(arg) : arg]))
        }}
        Object.assign(client, {json.dumps(settings)})
        await new Promise((resolve) => client.on('connected', resolve))""")


def subscribe(page: Page, channel: str, options: dict[str, Any]) -> Any:
    return run(page, f"""
        const sub = window.sub = client.subscribe({json.dumps(channel)}, {json.dumps(options)})
        for (const name of ['message', 'join', 'leave', 'subscribed', 'recovery_failed']) {{
          sub.on(name, (arg) => log.push([name, arg]))
        }}
        return await sub.ready""")


def test_connect_subscribe_publish_presence_stats_and_errors(
        server: Server, page: Page) -> None:
    connect(page, server, json.dumps(
        {"token": token("ana", subscribe=["chat.*"], publish=["chat.*"])}))
    welcome = events(page, "connected")[0]
    assert welcome["type"] == "welcome" and welcome["data"]["user"] == "ana"

    assert subscribe(page, "chat.lobby", {"joinLeave": True}) == {
        "type": "subscribed", "channel": "chat.lobby", "id": 1}
    published = run(page, "return await client.publish('chat.lobby', { text: 'hi' })")
    assert published == {"type": "published", "channel": "chat.lobby", "id": 2}
    wait_for(lambda: events(page, "message"))
    message = events(page, "message")[0]
    assert message["type"] == "message" and message["data"] == {"text": "hi"}
    assert message["from"] == welcome["data"]["clientId"]

    refused = run(page, """
        try { await client.publish('news.today', 1) } catch (error) {
          return { name: error.name, code: error.code, message: error.message,
                   isError: error instanceof Error, reply: error.reply }
        }""")
    assert refused == {"name": "ServerError", "code": 403, "isError": True,
                       "message": "403 not permitted to publish to news.today",
                       "reply": {"type": "error", "code": 403, "id": 3,
                                 "message": "not permitted to publish to news.today"}}

    with server.websocket("bob") as bob:
        bob.send(json.dumps({"type": "subscribe", "channel": "chat.lobby"}))
        assert messages_of(bob)[0]["type"] == "subscribed"
        wait_for(lambda: events(page, "join"))
        join = events(page, "join")[0]
        assert join["type"] == "join" and join["data"]["user"] == "bob"
        presence = run(page, "return await client.presence('chat.lobby')")
        assert presence["data"]["count"] == 2
        assert {c["user"] for c in presence["data"]["clients"]} == {"ana", "bob"}
    wait_for(lambda: events(page, "leave"))
    assert events(page, "leave")[0]["data"]["user"] == "bob"

    stats = run(page, "return await client.stats()")
    assert stats["type"] == "stats" and stats["data"]["user"] == "ana"
    assert stats["data"]["channels"] == ["chat.lobby"]

    forbidden = run(page, """
        const sub = client.subscribe('news.today')
        const ended = new Promise((resolve) => sub.on('unsubscribed', resolve))
        const code = await sub.ready.then(() => 'subscribed', (error) => error.code)
        return [code, (await ended).reason]""")
    assert forbidden == [403, "error"]
    history = run(page, "return await client.history('chat.lobby', { limit: 10 })"
                        ".catch((error) => [error.code, error.reply.message])")
    assert history["data"] == {"offset": 0, "epoch": "", "messages": []}  # none kept here
    run(page, "await sub.unsubscribe()")
    assert run(page, "return (await client.stats()).data.channels") == []
    run(page, "client.close()")
    assert events(page, "disconnected") == [1000]


def test_what_the_server_would_refuse_is_refused_before_sending(
        server: Server, page: Page) -> None:
    connect(page, server, json.dumps({"token": token("ana")}))
    refusals = run(page, """
        const reasons = []
        const refused = async (action) => {
          try { await action() } catch (error) { reasons.push(error.message); return }
          reasons.push('not refused')
        }
        const before = (await client.stats()).data.messagesReceived
        await refused(() => client.subscribe('bad channel'))
        await refused(() => client.subscribe('x'.repeat(256)))
        await refused(() => client.publish('', 1))
        await refused(() => client.publish('big', 'é'.repeat(40000)))
        await refused(() => client.publish('big', undefined))
        await refused(() => client.presence('no*stars'))
        const after = (await client.stats()).data.messagesReceived
        return { reasons, sent: after - before - 1 }""")
    assert refusals["sent"] == 0  # the second stats, and nothing else
    reasons = refusals["reasons"]
    assert reasons[0] == ('invalid channel name "bad channel": use 1-255 characters from '
                          "A-Z a-z 0-9 _ - . : @ /")
    assert all(reason.startswith("invalid channel name") for reason in [*reasons[:3], reasons[5]])
    # UTF-8 bytes counted, not characters: 40,000 é and the request's 51 bytes around them
    assert reasons[3].startswith("publish of 80051 bytes is over the 65536-byte limit")
    assert reasons[4].startswith("publish needs data")


def test_reconnects_resubscribes_and_receives_after_a_restart(
        server: Server, page: Page) -> None:
    connect(page, server, json.dumps({"token": token("ana")}),
            reconnectBase=100, reconnectCap=1000)
    subscribe(page, "chat.lobby", {"recover": True})
    first = events(page, "connected")[0]
    kill_and_restart(server)
    wait_for(lambda: len(events(page, "subscribed")) == 2, timeout=15)
    assert events(page, "disconnected") == [1006]
    assert all(error.startswith("ConnectionError: connection attempt")
               for error in events(page, "error"))  # while the server was away
    second = events(page, "connected")[1]
    assert second["data"]["clientId"] != first["data"]["clientId"]
    with server.websocket("bob") as bob:
        bob.send(json.dumps({"type": "publish", "channel": "chat.lobby",
                             "data": "after the restart"}))
        wait_for(lambda: events(page, "message"))
    assert [m["data"] for m in events(page, "message")] == ["after the restart"]
    assert events(page, "recovery_failed") == []  # no history on this server: nothing to recover


def test_recovers_exactly_what_was_published_while_its_server_was_down(
        server: Server, page: Page, start_server: Any, redis_server: RedisServer) -> None:
    options = ("--redis", redis_server.url, "--history-size", "100")
    near, far = start_server(*options), start_server(*options)
    near.wait_ready()
    far.wait_ready()
    connect(page, near, json.dumps({"token": token("ana")}), reconnectBase=100,
            reconnectCap=1000)
    subscribe(page, "feed", {"recover": True})
    with far.websocket("bob") as bob:
        def publish(n: int) -> None:
            bob.send(json.dumps({"type": "publish", "channel": "feed", "data": n}))

        for n in range(3):
            publish(n)
        wait_for(lambda: len(events(page, "message")) == 3)
        kill(near)
        for n in range(3, 8):  # while the page's server is away
            publish(n)
        restart(near)
        wait_for(lambda: len(events(page, "subscribed")) == 2, timeout=15)
        publish(8)
        wait_for(lambda: len(events(page, "message")) == 9, timeout=10)
    messages = events(page, "message")
    assert [message["data"] for message in messages] == list(range(9))
    assert [message["offset"] for message in messages] == list(range(1, 10))
    assert events(page, "subscribed")[1]["recovered"] is True
    assert events(page, "recovery_failed") == []


@pytest.fixture
def token_endpoint() -> Iterator[tuple[str, list[str]]]:
    """An application's token endpoint: GET → a fresh 3 s token for `dana` (CORS open)."""
    issued: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            issued.append(token("dana", ttl=3))
            self.send_response(200)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()
            self.wfile.write(issued[-1].encode())

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as http:
        thread = threading.Thread(target=http.serve_forever)
        thread.start()
        try:
            yield f"http://127.0.0.1:{http.server_address[1]}/token", issued
        finally:
            http.shutdown()
            thread.join()


def test_a_short_token_refreshed_through_get_token_keeps_the_connection(
        server: Server, page: Page, token_endpoint: tuple[str, list[str]]) -> None:
    url, issued = token_endpoint
    connect(page, server, f"{{ getToken: async () => (await fetch({json.dumps(url)})).text() }}")
    run(page, "await new Promise((resolve) => setTimeout(resolve, 7000))", timeout=20)
    assert events(page, "disconnected") == [] and events(page, "error") == []
    assert len(events(page, "connected")) == 1
    assert run(page, "return (await client.stats()).data.user") == "dana"
    assert len(issued) >= 4  # the connection's, then a refresh before each expiry
    # the newest token issued (a refresh may be on its way at this very moment)
    wait_for(lambda: run(page, "return client.token") == issued[-1], timeout=5)


# Under Node, with a stand-in WebSocket ----------------------------------------------------

BOOKKEEPING = """
import { Client, backoffDelay } from './fastfan.mjs'

const sockets = []
class Fake {
  constructor (url) { this.url = url; this.sent = []; sockets.push(this) }
  send (text) { this.sent.push(JSON.parse(text)) }
  close () {}
  receive (message) { this.onmessage({ data: JSON.stringify(message) }) }
}
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const tick = () => sleep(20)
const report = {}
const client = new Client('ws://fastfan.test/ws?a=1', { token: 'T', WebSocket: Fake,
                                                       reconnectBase: 1, pingInterval: null })
await tick()
report.url = sockets[0].url
const sub = client.subscribe('h', { recover: true })
const seen = []
sub.on('message', (message) => seen.push(message.offset))
sub.on('recovery_failed', (reply) => seen.push(['recovery_failed', reply.offset]))
sockets[0].receive({ type: 'welcome', data: { clientId: 'c1' } })
report.first = sockets[0].sent.shift()
sockets[0].receive({ type: 'subscribed', channel: 'h', offset: 0, epoch: 'e1', id: 1 })
for (const offset of [1, 2]) {
  sockets[0].receive({ type: 'message', channel: 'h', data: 0, offset, epoch: 'e1' })
}
sockets[0].onclose({ code: 1006 })
await tick()
sockets[1].receive({ type: 'welcome', data: { clientId: 'c2' } })
report.again = sockets[1].sent.shift()
sockets[1].receive({ type: 'subscribed', channel: 'h', offset: 9, epoch: 'e2', recovered: false,
                     id: report.again.id })
sockets[1].onclose({ code: 1006 })
await tick()
sockets[2].receive({ type: 'welcome', data: { clientId: 'c3' } })
report.third = sockets[2].sent.shift()
report.seen = seen
report.ready = await sub.ready
const replies = [client.publish('h', 1), client.publish('h', 2)]
const [one, two] = sockets[2].sent.splice(0)
sockets[2].receive({ type: 'published', channel: 'h', id: two.id })
sockets[2].receive({ type: 'error', code: 429, message: 'slow down', id: one.id })
report.replies = await Promise.allSettled(replies).then((all) => all.map(
  (r) => r.status === 'fulfilled' ? r.value : [r.reason.name, r.reason.code]))
report.backoff = [0, 1, 5, 6, 7].map((n) => backoffDelay(n, 500, 30000, () => 1))
client.close()
report.closed = await client.stats().catch((error) => [error.name, error.message])

const waiting = new Client('ws://fastfan.test/', { WebSocket: Fake, requestTimeout: 20 })
await tick()
report.timedOut = await waiting.stats().catch((error) => error.name)
sockets.at(-1).receive({ type: 'welcome', data: { clientId: 'w' } })
report.sentLate = sockets.at(-1).sent  // a request that timed out waiting is never sent
waiting.close()

const silent = new Client('ws://fastfan.test/', { WebSocket: Fake, pingInterval: 30,
                                                  requestTimeout: 60, reconnectBase: 1 })
const drops = []
silent.on('disconnected', (code) => drops.push(code))
await tick()
const quiet = sockets.at(-1)
quiet.receive({ type: 'welcome', data: { clientId: 'q' } })
await sleep(200)
report.ping = { sent: quiet.sent[0], drops, replaced: sockets.at(-1) !== quiet }
silent.close()
console.log(JSON.stringify(report))
"""


@node_only
def test_ids_recovery_bookkeeping_and_backoff(tmp_path: Path) -> None:
    shutil.copy(SCRIPT, tmp_path / "fastfan.mjs")
    (tmp_path / "bookkeeping.mjs").write_text(BOOKKEEPING)
    result = subprocess.run([NODE, str(tmp_path / "bookkeeping.mjs")], capture_output=True,
                            text=True, timeout=30, check=True)
    report = json.loads(result.stdout)
    assert report["url"] == "ws://fastfan.test/ws?a=1&token=T"  # browsers cannot set headers
    assert report["first"] == {"type": "subscribe", "channel": "h", "id": 1}
    # from the last message seen, then live from the reply after a failed recovery
    assert report["again"] == {"type": "subscribe", "channel": "h", "id": 2,
                               "recover": {"offset": 2, "epoch": "e1"}}
    assert report["third"] == {"type": "subscribe", "channel": "h", "id": 3,
                               "recover": {"offset": 9, "epoch": "e2"}}
    assert report["seen"] == [1, 2, ["recovery_failed", 9]]
    assert report["ready"]["offset"] == 0  # the first `subscribed`
    assert report["replies"] == [["ServerError", 429],  # each settled by its own id
                                 {"type": "published", "channel": "h", "id": 5}]
    assert report["backoff"] == [500, 1000, 16000, 30000, 30000]
    assert report["closed"] == ["ConnectionError", "the client is closed"]
    assert report["timedOut"] == "TimeoutError" and report["sentLate"] == []
    # a connection that stays silent is pinged, then given up and replaced
    assert report["ping"] == {"sent": {"type": "ping", "id": 1}, "drops": [1006],
                              "replaced": True}
