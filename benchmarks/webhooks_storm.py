"""What webhooks cost in a join storm: N clients connect and subscribe each to a channel
of its own, then all drop at once; the server's CPU for each storm with webhooks off and
on, and with them on, the events and requests a real receiver (aiohttp.web, in this
process) got and how long after the storm the last one came.

    nice .venv/bin/python benchmarks/webhooks_storm.py [--clients 10000] [--workers 1]
        [--redis redis://127.0.0.1:6379/0]

Prints one JSON line per run ("off", then "on").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from typing import Any

from aiohttp import web
from lib import Subscribers, cpu_seconds, free_port, metrics, start_fastfan

SECRET = "storm-secret"


class Receiver:
    """Counts the requests and events it takes, and when the last came."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests = self.events = 0
        self.last_at = 0.0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._serve, args=(started,), daemon=True).start()
        started.wait(5)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/", self._take)
        runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        started.set()
        self.loop.run_forever()

    async def _take(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        self.events += body.count(b'"name":')
        self.last_at = time.monotonic()
        return web.Response(status=204)

    def wait_for(self, events: int, timeout: float = 120) -> float:
        """Until `events` have come; when the last of them came."""
        deadline = time.monotonic() + timeout
        while self.events < events and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.last_at


def storm(clients: int, workers: int, redis: str | None,
          receiver: Receiver | None) -> dict[str, Any]:
    port = free_port()
    extra = ["--workers", str(workers), "--max-subscriptions", "8",
             *(["--redis", redis] if redis else [])]
    if receiver is not None:
        extra += ["--webhook-url", f"http://127.0.0.1:{receiver.port}/",
                  "--webhook-secret", SECRET, "--webhook-vacated-delay", "0"]
    server = start_fastfan(port, extra, pin=False)
    try:
        channel = f"storm{time.time_ns()}"
        before = cpu_seconds(server.pid)
        started = time.monotonic()
        with Subscribers([port], subs=clients, channel=channel,
                         extra=["--channels", str(clients)]) as subscribers:
            subscribers.ready()
            joined_s = time.monotonic() - started
            # each client: its channel occupied, and the user (anonymous) added to it
            joined_events_at = receiver.wait_for(2 * clients) if receiver else time.monotonic()
            join_cpu = cpu_seconds(server.pid) - before
            before, dropped_at = cpu_seconds(server.pid), time.monotonic()
        while metrics(port).get("fastfan_connections", 0) > 0:
            time.sleep(0.05)
        left_events_at = receiver.wait_for(4 * clients) if receiver else time.monotonic()
        leave_cpu = cpu_seconds(server.pid) - before
        figures = metrics(port)
        return {"webhooks": "on" if receiver else "off", "clients": clients, "workers": workers,
                "bus": "redis" if redis else "embedded",
                "join_s": round(joined_s, 2), "join_cpu_s": round(join_cpu, 2),
                "leave_cpu_s": round(leave_cpu, 2),
                "join_events_after_s": round(max(0.0, joined_events_at - started - joined_s), 2),
                "leave_events_after_s": round(max(0.0, left_events_at - dropped_at), 2),
                "events": receiver.events if receiver else 0,
                "requests": receiver.requests if receiver else 0,
                "dropped": figures.get("fastfan_webhook_dropped_total", 0),
                "failures": figures.get("fastfan_webhook_failures_total", 0)}
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--redis", help="a running Redis's URL: the Redis bus")
    args = parser.parse_args()
    print(json.dumps(storm(args.clients, args.workers, args.redis, None)), flush=True)
    print(json.dumps(storm(args.clients, args.workers, args.redis, Receiver())), flush=True)


if __name__ == "__main__":
    main()
