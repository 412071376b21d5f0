"""Webhooks: the backend is told when a channel fills or empties, who comes and goes, what
clients publish and which connections close (--webhook-url; docs/webhooks.md).

Where events come from: the bus's transitions (Bus.watch_transitions: each change across
the whole deployment, on exactly one of its workers), and the Hub of the worker holding
the connection (`client_publish`, `connection_closed`: Hub.publish_webhook and
Hub.close_webhook, None when off, so the Hub pays one pointer test for them). A
`channel_vacated` waits --webhook-vacated-delay and is forgotten, with the
`channel_occupied` that cancels it, if the channel fills again meanwhile.

Each event gets an id unique across the deployment (this process's random prefix and a
counter), is encoded once and queued for every URL. Per URL one task POSTs batches: at
most --webhook-batch events, waiting at most BATCH_WAIT for them, as `{"time_ms":T,
"events":[...]}` signed with `X-Fastfan-Signature: sha256=<hex HMAC-SHA256(secret, body)>`.
A batch that fails (non-2xx, no answer in REQUEST_TIMEOUT, refused) is tried again with
exponential backoff, the same batch with the same ids, and nothing after it goes first:
events arrive in order (per channel, and in all). An event not taken within
--webhook-retry is dropped and counted, never delivered late. A URL's queue holds at most
--webhook-queue-bytes of events: past it the oldest go, counted and logged at most once a
minute.

With --webhook-format pusher (fastfan.pusher), the events are Pusher's: only those of
Pusher channels, each app's to its own queue per URL, named as Pusher names them
(`user_id`; `client_event` for a client event on a channel matching --webhook-publish),
channel names without `pusher.ID.`, and signed with the app's secret (`X-Pusher-Key`,
`X-Pusher-Signature`: hex, no prefix), as the Pusher server libraries check them.

Nothing of it is on the fan-out path: the bus and the Hub append to a deque; the POSTs run
in their own task; a receiver that is down costs the bounded queue, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from .._core import Hub
from ..auth import ChannelPatterns
from ..config import Config
from ..pusher import BUS_PREFIX as PUSHER_PREFIX
from ..pusher import PusherApp, parse_apps

if TYPE_CHECKING:  # aiohttp is imported where used: without webhooks a worker never loads it
    import aiohttp

log = logging.getLogger("fastfan.webhooks")

SIGNATURE_HEADER = "X-Fastfan-Signature"
# A batch waits this long at most for more events to fill it.
BATCH_WAIT = 0.1
# The first retry of a failed batch comes this long after, each next one twice as long
# after the last, at most RETRY_DELAY_MAX.
RETRY_DELAY_FIRST = 0.1
RETRY_DELAY_MAX = 10.0
# A receiver that has not answered a POST in this long failed it.
REQUEST_TIMEOUT = 10.0
# Dropped events are logged at most this often per URL.
DROP_LOG_PERIOD = 60.0
# A stopping worker gives its queues this long to empty.
STOP_GRACE = 1.0

_encode = msgspec.json.encode


def sign(body: bytes, secret: str) -> str:
    """The X-Fastfan-Signature of `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, headers: Mapping[str, str], secret: str) -> bool:
    """Whether a webhook request (its raw body and its headers, any case) was signed with
    `secret`: for Python receivers."""
    signature = next((value for name, value in headers.items()
                      if name.lower() == SIGNATURE_HEADER.lower()), None)
    return signature is not None and hmac.compare_digest(signature, sign(body, secret))


class Counters:
    """What /metrics says of the webhooks (fastfan_webhook_*_total)."""

    def __init__(self) -> None:
        self.events = 0    # events a receiver took (once per URL)
        self.failures = 0  # POSTs that failed
        self.dropped = 0   # events never taken: past the queue's bound or --webhook-retry


class Endpoint:
    """One URL: its queue of undelivered events, in order, and the task that POSTs them.

    An event leaves the queue when a receiver takes it, or dropped: past the byte bound
    (the oldest first, those of a batch being tried included) or past --webhook-retry.
    A failed batch is tried again from the head of the queue: the same events with the
    same ids, less those dropped meanwhile.
    """

    def __init__(self, url: str, config: Config, secret: str, counters: Counters,
                 pusher_key: str | None = None) -> None:
        self.url = url
        self.pusher_key = pusher_key  # Pusher's format: this app's key, its secret signs
        self.configure(config, secret)
        self.counters = counters
        self.queue: deque[tuple[float, int, bytes]] = deque()  # (queued at, number, event)
        self.queued_bytes = 0
        self.numbers = itertools.count()
        self.waiting = asyncio.Event()  # something is queued
        self.filled = asyncio.Event()  # a whole batch is queued
        self.unlogged_drops = 0
        self.drops_logged_at = -DROP_LOG_PERIOD
        self.failing = False  # since the last POST that failed, until one succeeds

    def configure(self, config: Config, secret: str) -> None:
        """Its secret and options, at start and on a reload (the next batch has them)."""
        self.secret = secret
        self.batch = config.webhook_batch
        self.retry = config.webhook_retry
        self.max_bytes = config.webhook_queue_bytes

    def put(self, event: bytes, now: float) -> None:
        self.queue.append((now, next(self.numbers), event))
        self.queued_bytes += len(event)
        dropped = 0
        while self.queued_bytes > self.max_bytes:
            self._pop()
            dropped += 1
        if dropped:
            self._dropped(dropped, now, f"past --webhook-queue-bytes {self.max_bytes}")
        self.waiting.set()
        if len(self.queue) >= self.batch:
            self.filled.set()

    def _pop(self) -> None:
        self.queued_bytes -= len(self.queue.popleft()[2])
        if not self.queue:
            self.waiting.clear()
        if len(self.queue) < self.batch:
            self.filled.clear()

    def _dropped(self, count: int, now: float, why: str) -> None:
        self.counters.dropped += count
        self.unlogged_drops += count
        if now - self.drops_logged_at >= DROP_LOG_PERIOD:
            log.warning("webhooks: %d events for %s dropped (%s)", self.unlogged_drops,
                        self.url, why)
            self.unlogged_drops, self.drops_logged_at = 0, now

    async def send_forever(self, session: aiohttp.ClientSession) -> None:
        delay = 0.0  # before the next try of a batch that failed; 0: the last one went
        while True:
            await self.waiting.wait()
            if not delay and len(self.queue) < self.batch:  # a new batch: let it fill
                wait = self.queue[0][0] + BATCH_WAIT - time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.filled.wait(), max(0.0, wait))
            now, expired = time.monotonic(), 0
            while self.queue and now - self.queue[0][0] >= self.retry:
                self._pop()
                expired += 1
            if expired:
                self._dropped(expired, now, f"not taken within --webhook-retry {self.retry:g} s")
            if not self.queue:
                continue
            batch = list(itertools.islice(self.queue, self.batch))
            if await self._post(session, [event for _, _, event in batch]):
                delay = 0.0
                last = batch[-1][1]
                while self.queue and self.queue[0][1] <= last:
                    self._pop()
            else:
                delay = min(delay * 2, RETRY_DELAY_MAX) if delay else RETRY_DELAY_FIRST
                await asyncio.sleep(delay)

    async def _post(self, session: aiohttp.ClientSession, events: list[bytes]) -> bool:
        """One POST of `events`; whether a receiver took them (2xx)."""
        import aiohttp

        body = b'{"time_ms":%d,"events":[%s]}' % (time.time() * 1000, b",".join(events))
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, self.secret)} \
            if self.pusher_key is None else {
                "Content-Type": "application/json", "X-Pusher-Key": self.pusher_key,
                "X-Pusher-Signature": hmac.new(self.secret.encode(), body,
                                               hashlib.sha256).hexdigest()}
        try:
            async with session.post(self.url, data=body, headers=headers) as response:
                await response.read()
                failure = None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            failure = str(exc) or type(exc).__name__
        if failure is None:
            self.counters.events += len(events)
            if self.failing:
                log.info("webhooks: %s takes events again", self.url)
                self.failing = False
            return True
        self.counters.failures += 1
        if not self.failing:
            log.warning("webhooks: %s failed (%s); retrying for up to %g s", self.url, failure,
                        self.retry)
            self.failing = True
        return False


class Webhooks:
    """A worker's webhooks: a Transitions for its bus, and its Hub's two hooks."""

    def __init__(self, config: Config) -> None:
        self.counters = Counters()
        self.endpoints: list[Endpoint] = []
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(6)  # this process's: ids unique everywhere
        self._vacating: dict[str, asyncio.TimerHandle] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[Endpoint, asyncio.Task[None]] = {}
        self._configure(config)

    def _configure(self, config: Config) -> None:
        """The URLs, secrets and options of `config`: at start, and on a reload, where an
        endpoint (a URL, and in Pusher's format an app) kept keeps its queue."""
        assert config.webhook_url is not None
        urls = [url.strip() for url in config.webhook_url.split(",") if url.strip()]
        kept = {(endpoint.url, endpoint.pusher_key): endpoint for endpoint in self.endpoints}

        def endpoint(url: str, secret: str, key: str | None = None) -> Endpoint:
            existing = kept.get((url, key))
            if existing is None:
                return Endpoint(url, config, secret, self.counters, key)
            existing.configure(config, secret)
            return existing

        # Pusher's format: each app's endpoints, by app id; else None
        self.pusher_endpoints: dict[str, list[Endpoint]] | None = None
        if config.webhook_format == "pusher":
            apps: list[PusherApp] = parse_apps(config.pusher_app)
            self.pusher_endpoints = {app.id: [endpoint(url, app.secret, app.key)
                                              for url in urls] for app in apps}
            self.endpoints = [endpoint for endpoints in self.pusher_endpoints.values()
                              for endpoint in endpoints]
        else:
            assert config.webhook_secret is not None
            self.endpoints = [endpoint(url, config.webhook_secret) for url in urls]
        self.vacated_delay = config.webhook_vacated_delay
        self.publish_patterns = ChannelPatterns(config.webhook_publish.split(",")) \
            if config.webhook_publish else None
        self.connections = config.webhook_connections

    def reconfigure(self, config: Config, hub: Hub) -> None:
        """A reload: the URLs, secrets and options in force from now on. A URL kept keeps
        its queue and its task; a new one starts empty; one no longer named stops, what
        its queue held dropped."""
        self._configure(config)
        hub.publish_webhook = hub.close_webhook = None
        self.hook(hub)
        for gone in [endpoint for endpoint in self._tasks if endpoint not in self.endpoints]:
            self._tasks.pop(gone).cancel()
        self._start_tasks()

    def hook(self, hub: Hub) -> None:
        """Give the Hub the hooks it needs (only those: an unused one costs a call)."""
        if self.pusher_endpoints is not None:
            return  # fastfan's clients' publishes and closes are not Pusher events
        if self.publish_patterns is not None:
            hub.publish_webhook = self.client_publish
        if self.connections:
            hub.close_webhook = self.connection_closed

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            connector=aiohttp.TCPConnector())  # kept alive: one connection per URL, reused
        self._start_tasks()

    def _start_tasks(self) -> None:
        """One task per endpoint, POSTing (once started)."""
        if self._session is None:
            return
        loop = asyncio.get_running_loop()
        for endpoint in self.endpoints:
            if endpoint not in self._tasks:
                self._tasks[endpoint] = loop.create_task(endpoint.send_forever(self._session))

    async def stop(self) -> None:
        """The vacated still held back go now (the channels did empty); the queues get
        STOP_GRACE to empty."""
        for channel, handle in list(self._vacating.items()):
            handle.cancel()
            self._vacated_now(channel)
        deadline = time.monotonic() + STOP_GRACE
        while any(endpoint.queue for endpoint in self.endpoints) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in self._tasks.values():
            task.cancel()
        if self._session is not None:
            await self._session.close()

    def figures(self) -> dict[str, float]:
        """Rows of /metrics (fastfan.metrics.METRICS)."""
        return {"webhook_events_total": float(self.counters.events),
                "webhook_failures_total": float(self.counters.failures),
                "webhook_dropped_total": float(self.counters.dropped)}

    def _emit(self, event: dict[str, Any]) -> None:
        endpoints = self.endpoints
        if self.pusher_endpoints is not None:
            # Pusher's: only a Pusher channel's, to its app's endpoints, under its own name
            app_id, _, channel = event["channel"].removeprefix(PUSHER_PREFIX).partition(".")
            if not event["channel"].startswith(PUSHER_PREFIX) \
                    or app_id not in self.pusher_endpoints:
                return
            endpoints = self.pusher_endpoints[app_id]
            event = {**event, "channel": channel}
            if "user" in event:
                if not channel.startswith("presence-"):
                    return  # members of a channel fastfan has presence on, Pusher not
                event["user_id"] = event.pop("user")
        encoded = _encode({"id": f"{self._id_prefix}-{next(self._ids)}", **event})
        now = time.monotonic()
        for endpoint in endpoints:
            endpoint.put(encoded, now)

    # Transitions (fastfan.bus.base.Transitions) ---------------------------------------

    def occupied(self, channel: str) -> None:
        held = self._vacating.pop(channel, None)
        if held is not None:  # filled again within the delay: neither is news
            held.cancel()
            return
        self._emit({"name": "channel_occupied", "channel": channel})

    def vacated(self, channel: str) -> None:
        if self.vacated_delay <= 0:
            self._vacated_now(channel)
            return
        self._vacating[channel] = asyncio.get_running_loop().call_later(
            self.vacated_delay, self._vacated_now, channel)

    def _vacated_now(self, channel: str) -> None:
        self._vacating.pop(channel, None)
        self._emit({"name": "channel_vacated", "channel": channel})

    def member_added(self, channel: str, user: str) -> None:
        self._emit({"name": "member_added", "channel": channel, "user": user})

    def member_removed(self, channel: str, user: str) -> None:
        self._emit({"name": "member_removed", "channel": channel, "user": user})

    # The Hub's hooks ------------------------------------------------------------------

    def client_publish(self, channel: str, user: str, client_id: bytes,
                       data: msgspec.Raw) -> None:
        assert self.publish_patterns is not None
        if self.publish_patterns.allows(channel):
            self._emit({"name": "client_publish", "channel": channel, "user": user,
                        "client": client_id.decode("ascii"), "data": data})

    def client_event(self, bus_channel: str, event: str, data: Any, socket_id: str,
                     user_id: str | None) -> None:
        """A Pusher client event (fastfan.pusher.protocol), in Pusher's format, on a channel
        whose Pusher name matches --webhook-publish."""
        channel = bus_channel.removeprefix(PUSHER_PREFIX).partition(".")[2]
        if self.publish_patterns is None or not self.publish_patterns.allows(channel):
            return
        fields = {"name": "client_event", "channel": bus_channel, "event": event,
                  "data": data if isinstance(data, str) else _encode(data).decode(),
                  "socket_id": socket_id}
        if user_id is not None:
            fields["user_id"] = user_id
        self._emit(fields)

    def connection_closed(self, user: str, client_id: bytes, code: int, reason: str) -> None:
        self._emit({"name": "connection_closed", "user": user,
                    "client": client_id.decode("ascii"), "code": code, "reason": reason})
