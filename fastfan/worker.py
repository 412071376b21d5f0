"""One worker process: the loop, the picows server, the bus and the metrics wired together."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

import uvloop

from . import metrics, proxy
from ._core import WATCH_PREFIX, Hub
from .api import Api
from .app import load_app
from .auth import ChannelPatterns, token_verifier
from .bus.base import Transitions
from .bus.factory import make_bus
from .config import Config, ConfigError, reload, tls_context
from .directory import Node, node_name, process_start_time
from .handshake import ListenerFactory
from .hooks import Hooks
from .logs import PicowsLog, configure
from .metrics import SharedFigures
from .namespaces import Defaults, NamespaceTable, describe_changes, history_capacity
from .proxy import Proxies
from .pusher import CACHE_PATTERNS, PRESENCE_PATTERN, Pusher, parse_apps
from .pusher.api import PusherApi
from .webhooks import Webhooks
from .webhooks.occupancy import Listeners

log = logging.getLogger("fastfan.worker")

# The kernel caps the accept queue at net.core.somaxconn (4096 here). picows's default of
# 100 turns a burst of thousands of connects into SYN retries that take over a minute.
LISTEN_BACKLOG = 65535
# picows's read buffer starts here and grows with the largest frame. Client messages are small:
# 512 bytes (256 of them kept free for picows's SIMD parser) keep an idle connection small.
# That is the floor of our patched picows; picows 2.3.1 raises it to 2048 (patches/README.md).
READ_BUFFER_INIT_SIZE = 512
# A client that opens a TCP connection but sends no upgrade request in time is dropped.
HANDSHAKE_TIMEOUT = 5.0
# File descriptors a worker keeps for itself (listening socket, bus, logs, /proc reads).
FILES_RESERVED = 256
# How a worker leaves: on SIGTERM (the server stops) or SIGUSR2 (a rolling restart
# replaced it), each with its close code, the contract's.
SHUTTING_DOWN = (1001, "Server shutting down")
RESTARTING = (1012, "Server restarting")
# The closes of a shutdown are spread over this share of --shutdown-grace, so clients do
# not all reconnect elsewhere in the same millisecond; the rest of the grace is for their
# closing handshakes.
CLOSE_SPREAD = 0.5
# How often a starting worker asks itself whether it serves yet (a rolling restart waits
# for that before it sends the worker it replaces away).
SERVING_POLL = 0.02

def namespace_defaults(config: Config) -> Defaults:
    """What a channel no namespace takes has: the global options."""
    return Defaults(
        presence=ChannelPatterns(config.presence_channels.split(",") + (
            [PRESENCE_PATTERN] if config.pusher_app else [])),
        # Pusher's cache channels keep at least their latest event, whatever else does.
        history=ChannelPatterns(
            (config.history_channels.split(",") if config.history_size else [])
            + (CACHE_PATTERNS if config.pusher_app else [])),
        history_size=config.history_size or (1 if config.pusher_app else 0),
        history_ttl=config.history_ttl,
        proxy_subscribe=config.proxy_subscribe is not None,
        proxy_publish=config.proxy_publish is not None)


def max_connections(config: Config) -> int:
    """Past the open-files limit accept() fails anyway: refuse clearly a little before it."""
    if config.max_connections is not None:
        return config.max_connections
    return max(1, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FILES_RESERVED)


@dataclass(frozen=True)
class Placement:
    """Where a worker stands among its siblings, as the master forked it."""

    index: int  # among the master's workers, 0 to --workers - 1
    master_pid: int
    figures: SharedFigures
    mesh_sockets: str = ""  # the master's private folder of the embedded bus's sockets
    client_id_prefix: str = ""  # this worker's clientIds begin with it (random if empty)
    previous_client_id_prefix: str = ""  # the worker's this one replaces, if it died
    serving_fd: int = -1  # the master's pipe: our pid once we serve (Master._read_serving)
    load: Callable[[], Config] | None = None  # the configuration read again, on SIGHUP


class Worker:
    def __init__(self, config: Config, placement: Placement, sockets: list[socket.socket],
                 api_sockets: list[socket.socket]) -> None:
        self.config = config
        self.placement = placement
        self.sockets = sockets  # listening already, bound by the master (master.listen)
        self.loop = asyncio.get_running_loop()
        defaults = namespace_defaults(config)
        self.hub = Hub(
            self.loop,
            max_message_size=config.max_message_size,
            max_subscriptions=config.max_subscriptions,
            max_subscription_bytes=config.max_subscription_bytes,
            max_buffer=config.max_buffer,
            publish_rate=float(config.publish_rate),
            slow_consumer=config.slow_consumer_policy,
            presence_channels=defaults.presence,
            presence_limit=config.presence_limit,
            client_id_prefix=placement.client_id_prefix,
            # what the history stores are sized for: the most any channel keeps
            history_size=history_capacity(defaults.history_size, config.namespaces),
            history_channels=defaults.history,
            history_max_bytes=config.history_max_bytes,
            compression_min_size=config.compression_min_size,
            subscribe_rate=float(config.subscribe_rate),
            max_backlog=config.max_backlog,
        )
        self.namespace_table = self.hub.namespace_table = NamespaceTable(
            config.namespaces, defaults, self.hub)
        self._use_namespaces()
        self.node = Node(node_name(config.port), config.workers,
                         process_start_time(placement.master_pid), self.total_figures)
        self.bus = make_bus(config, self.hub, self.node, worker=placement.index,
                            master_pid=placement.master_pid,
                            mesh_sockets=placement.mesh_sockets,
                            predecessor=placement.previous_client_id_prefix)
        self.hub.bus = self.bus
        self.webhooks = None if config.webhook_url is None else Webhooks(config)
        if self.webhooks is not None:
            self.webhooks.hook(self.hub)
        # --app: the application's hooks (loaded and checked by the master already), and
        # the proxies' (--proxy-*), which are hooks too
        app = None if config.app is None else load_app(config.app)
        self.proxies = Proxies(config) if proxy.configured(config) else None
        if self.proxies is not None:
            app = self.proxies.install(app)
        self.hooks = None if app is None else Hooks(app, self.hub, config.hook_timeout)
        self.pusher_api = None if not config.pusher_app else PusherApi(
            Pusher(parse_apps(config.pusher_app), self.hub,
                   activity_timeout=max(1, int(config.ping_interval))),
            max_message_size=config.max_message_size)
        if self.pusher_api is not None and self.webhooks is not None \
                and config.webhook_format == "pusher":
            self.pusher_api.pusher.client_event_webhook = self.webhooks.client_event
        # the deployment's transitions: the webhooks', and Pusher's member events
        listeners: list[Transitions] = [listener for listener in (
            self.webhooks, None if self.pusher_api is None else self.pusher_api.pusher)
            if listener is not None]
        if listeners:
            self.bus.watch_transitions(listeners[0] if len(listeners) == 1
                                       else Listeners(listeners))
        self.accepting = False
        self.leaving: tuple[int, str] | None = None  # the close code and reason, once told
        self.factory = ListenerFactory(config, self.hub, why_not_ready=self.why_not_ready,
                                       metrics=self.render_metrics,
                                       max_connections=max_connections(config),
                                       logger=PicowsLog(),
                                       handshake_timeout=HANDSHAKE_TIMEOUT,
                                       read_buffer_init_size=READ_BUFFER_INIT_SIZE,
                                       pusher_api=self.pusher_api)
        self.api = None if config.api_port is None else Api(
            config, self.hub, metrics=self.render_metrics, figure_rows=self.figure_rows,
            node=self.node, worker=placement.index, why_not_ready=self.why_not_ready,
            sockets=api_sockets)
        self._stop = asyncio.Event()

    def why_not_ready(self) -> list[str]:
        """What keeps /ready from 200, as its 503 says it: nothing when ready."""
        if self.leaving is not None:
            return ["draining"]
        if not self.accepting:
            return ["starting"]
        return list(self.bus.health().down)

    def leave(self, how: tuple[int, str]) -> None:
        """SIGTERM or SIGUSR2: /ready and new upgrades answer 503 from now on, then
        serve() closes the clients with `how`."""
        if self.leaving is None or how == SHUTTING_DOWN:
            self.leaving = how
        self.factory.draining = True
        self._stop.set()

    async def reload(self) -> None:
        """SIGHUP: read the configuration again and apply what can change live (the
        master has checked it; read again here, it is checked again)."""
        assert self.placement.load is not None
        try:
            loaded = self.placement.load()
            done = reload(self.config, loaded)
            # With --jwks-url, building the verifier fetches the keys: not on the loop.
            verifier = await self.loop.run_in_executor(None, token_verifier, done.config)
        except ConfigError as exc:
            log.error("worker %d: reload refused, nothing changed: %s",
                      self.placement.index, exc)
            return
        config = self.config = done.config
        configure(config.log_level, config.log_format)
        if "namespaces" in done.changed:
            self._reload_namespaces(config)
        if self.webhooks is not None and any(name.startswith("webhook_")
                                             for name in done.changed):
            self.webhooks.reconfigure(config, self.hub)
        self.factory.reconfigure(config, None if verifier is None else verifier.verify,
                                 max_connections(config))
        if self.api is not None:
            self.api.reconfigure(config)
        hub = self.hub
        hub.max_subscriptions = config.max_subscriptions
        hub.max_subscription_bytes = config.max_subscription_bytes
        hub.max_buffer = config.max_buffer
        hub.publish_rate = float(config.publish_rate)
        hub.subscribe_rate = float(config.subscribe_rate)
        log.info("worker %d: reloaded", self.placement.index)

    def _use_namespaces(self) -> None:
        """The Hub looks at the namespaces only when there are some: else its presence and
        history patterns are the global ones, as without namespaces at all."""
        table, hub = self.namespace_table, self.hub
        hub.namespaces = table if table.active else None
        hub.presence_channels = table.presence if table.active else table.defaults.presence
        hub.history_channels = table.history if table.active else table.defaults.history

    def _reload_namespaces(self, config: Config) -> None:
        """New namespaces, for every channel from now on, those with subscribers too: a
        channel that gains presence has its subscribers counted there now, one that loses
        it has them taken out."""
        hub, table = self.hub, self.namespace_table
        channels = [name for name in hub.channels if not name.startswith(WATCH_PREFIX)]
        had_presence = {name: hub.presence_channels.allows(name) for name in channels}
        for change in describe_changes(table.namespaces, config.namespaces):
            log.info("worker %d: %s", self.placement.index, change)
        table.apply(config.namespaces, namespace_defaults(config))
        self._use_namespaces()
        for name in channels:
            if hub.presence_channels.allows(name) == had_presence[name]:
                continue
            for entry in hub.presence_of(name):
                if had_presence[name]:
                    self.bus.left(name, entry[0].encode())
                else:
                    self.bus.joined(name, entry[0].encode(), entry[1], entry[2],
                                    entry[3] if len(entry) > 3 else "")

    def publish_figures(self) -> None:
        """Write this worker's row of the figures every worker shares (not once it is
        replaced: the row is its replacement's)."""
        if self.leaving == RESTARTING:
            return
        figures: dict[str, float] = dict(self.hub.stats())
        figures["auth_failures_total"] = self.factory.auth_failures_total
        figures["connections_refused_total"] = self.factory.refused_full_total
        figures.update(self.bus.figures())
        if self.webhooks is not None:
            figures.update(self.webhooks.figures())
        if self.hooks is not None:
            figures.update(self.hooks.figures())
        latency = self.hub.publish_latency
        figures.update(metrics.latency_figures(latency.buckets(), latency.total, latency.count))
        self.placement.figures.write(self.placement.index, figures)

    def figure_rows(self) -> list[dict[str, float]]:
        """Every worker's row of the shared figures and the master's, this worker's fresh."""
        self.publish_figures()
        return self.placement.figures.each()

    def total_figures(self) -> dict[str, float]:
        """The whole server's figures, this worker's freshly written."""
        return metrics.add_up(self.figure_rows())

    def render_metrics(self) -> bytes:
        return metrics.render(self.total_figures())

    async def serve(self) -> None:
        config = self.config
        if self.webhooks is not None:
            await self.webhooks.start()
        await self.bus.start()
        # picows's ws_create_server, but with our protocol factory: it counts connections
        # from the accept, and answers HEAD (ListenerFactory.accept).
        tls = None if config.tls_cert is None else tls_context(config)
        servers = [await self.loop.create_server(
            self.factory.accept, sock=sock, backlog=LISTEN_BACKLOG, ssl=tls,
            # uvloop's default is 60 s: the TLS handshake gets the upgrade request's 5 s.
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if tls else None) for sock in self.sockets]
        if self.api is not None:
            await self.api.start(LISTEN_BACKLOG)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.leave, SHUTTING_DOWN)
        self.loop.add_signal_handler(signal.SIGUSR2, self.leave, RESTARTING)
        if self.placement.load is not None:
            self.loop.add_signal_handler(
                signal.SIGHUP, lambda: self.loop.create_task(self.reload()))
        self.accepting = True
        # What the worker built to get here lives as long as it does: a full collection
        # (one comes every so many new connections) need not walk it. 45,000 objects after
        # the imports alone, 10-20 ms of a collection's pause, paid in every client's latency.
        gc.freeze()
        log.info("worker %d listening on %s:%d", self.placement.index, config.host, config.port)
        tasks = [self.loop.create_task(self._sweep_forever()),
                 self.loop.create_task(self._log_stats_forever()),
                 self.loop.create_task(self._announce_serving())]
        await self._stop.wait()
        for task in tasks[1:]:  # the sweep goes on: a client that never answers our CLOSE
            task.cancel()
        await self._shut_down(servers)
        tasks[0].cancel()

    async def _announce_serving(self) -> None:
        """Tell the master once /ready would answer 200 (a rolling restart waits for it)."""
        while self.why_not_ready():
            await asyncio.sleep(SERVING_POLL)
        if self.placement.serving_fd >= 0:
            os.write(self.placement.serving_fd, f"{os.getpid()}\n".encode())
            os.kill(self.placement.master_pid, signal.SIGUSR1)

    async def _sweep_forever(self) -> None:
        while True:
            config = self.config  # a reload may change it
            await asyncio.sleep(min(1.0, config.ping_interval / 2, config.ping_timeout / 4))
            self.hub.sweep(config.ping_interval, config.ping_timeout)
            self.publish_figures()
            if os.getppid() != self.placement.master_pid:
                log.error("the master is gone; shutting down")
                self._stop.set()

    async def _log_stats_forever(self) -> None:
        """The seed's per-minute line: how long handling one client message took."""
        while True:
            await asyncio.sleep(self.config.stats_interval)
            figures = self.hub.handling.take()
            log.info("stats: %d messages, handling min %.3f ms, max %.3f ms, avg %.3f ms, "
                     "p95 %.3f ms, p99 %.3f ms", figures["count"], figures["min_ms"],
                     figures["max_ms"], figures["avg_ms"], figures["p95_ms"], figures["p99_ms"],
                     extra={"fields": {"stats": figures, "worker": self.placement.index}})

    async def _shut_down(self, servers: list[asyncio.Server]) -> None:
        """Leave as `leaving` says: on SIGTERM, keep answering /ready (503 draining) and
        refusing upgrades for --drain-delay, then close the clients with 1001 spread over
        the grace's first half; replaced by a rolling restart, stop accepting at once (the
        replacement accepts on the same sockets) and close them with 1012 the same way.
        Then wait for the clients within the grace and stop the bus."""
        config = self.config
        if self.leaving is None:  # stopped without being told why (its master is gone)
            self.leaving = SHUTTING_DOWN
        if self.leaving == RESTARTING:
            self._close_servers(servers)
        else:
            await asyncio.sleep(config.drain_delay)
        start = self.loop.time()
        sessions = list(self.hub.sessions)
        spread = config.shutdown_grace * CLOSE_SPREAD
        code, reason = self.leaving
        for number, session in enumerate(sessions):
            due = start + spread * number / len(sessions)
            if due > self.loop.time():
                await asyncio.sleep(due - self.loop.time())
            if self.leaving != (code, reason):  # a SIGTERM while restarting: 1001 from here
                code, reason = self.leaving
            session.close(code, reason)
        self.hub.close_all(code, reason)  # any upgrade that was under way meanwhile
        self._close_servers(servers)
        deadline = start + config.shutdown_grace
        while self.hub.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.hub.connections:
            log.warning("shutdown grace over with %d connections open", self.hub.connections)
        await self.bus.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
        if self.proxies is not None:
            await self.proxies.close()
        log.info("worker %d stopped", self.placement.index)

    def _close_servers(self, servers: list[asyncio.Server]) -> None:
        if not self.accepting:
            return  # closed already
        self.accepting = False
        for server in servers:
            server.close()
        if self.api is not None:
            self.api.close()
        if self.pusher_api is not None:
            self.pusher_api.http.close()


def run_worker(config: Config, placement: Placement, sockets: list[socket.socket],
               api_sockets: list[socket.socket]) -> None:
    async def main() -> None:
        await Worker(config, placement, sockets, api_sockets).serve()

    uvloop.run(main())
