"""One worker process: the loop, the picows server, the bus and the metrics wired together."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import socket
from dataclasses import dataclass

import uvloop

from . import metrics
from ._core import Hub
from .api import Api
from .auth import ChannelPatterns
from .bus.factory import make_bus
from .config import Config, tls_context
from .directory import Node, node_name, process_start_time
from .handshake import ListenerFactory
from .logs import PicowsLog
from .metrics import SharedFigures
from .pusher import CACHE_PATTERNS, PRESENCE_PATTERN, Pusher, parse_apps
from .pusher.api import PusherApi
from .webhooks import Webhooks

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


class Worker:
    def __init__(self, config: Config, placement: Placement, sockets: list[socket.socket],
                 api_sockets: list[socket.socket]) -> None:
        self.config = config
        self.placement = placement
        self.sockets = sockets  # listening already, bound by the master (master.listen)
        self.loop = asyncio.get_running_loop()
        self.hub = Hub(
            self.loop,
            max_message_size=config.max_message_size,
            max_subscriptions=config.max_subscriptions,
            max_subscription_bytes=config.max_subscription_bytes,
            max_buffer=config.max_buffer,
            publish_rate=float(config.publish_rate),
            slow_consumer=config.slow_consumer_policy,
            presence_channels=ChannelPatterns(config.presence_channels.split(",") + (
                [PRESENCE_PATTERN] if config.pusher_app else [])),
            presence_limit=config.presence_limit,
            client_id_prefix=placement.client_id_prefix,
            # Pusher's cache channels keep at least their latest event, whatever else does.
            history_size=config.history_size or (1 if config.pusher_app else 0),
            history_channels=ChannelPatterns(
                (config.history_channels.split(",") if config.history_size else [])
                + (CACHE_PATTERNS if config.pusher_app else [])),
            history_max_bytes=config.history_max_bytes,
            compression_min_size=config.compression_min_size,
            subscribe_rate=float(config.subscribe_rate),
            max_backlog=config.max_backlog,
        )
        self.node = Node(node_name(config.port), config.workers,
                         process_start_time(placement.master_pid), self.total_figures)
        self.bus = make_bus(config, self.hub, self.node, worker=placement.index,
                            master_pid=placement.master_pid,
                            mesh_sockets=placement.mesh_sockets,
                            predecessor=placement.previous_client_id_prefix)
        self.hub.bus = self.bus
        self.webhooks = None if config.webhook_url is None else Webhooks(config)
        if self.webhooks is not None:
            self.bus.watch_transitions(self.webhooks)
            self.webhooks.hook(self.hub)
        self.pusher_api = None if not config.pusher_app else PusherApi(
            Pusher(parse_apps(config.pusher_app), self.hub,
                   activity_timeout=max(1, int(config.ping_interval))),
            max_message_size=config.max_message_size)
        if self.pusher_api is not None and self.webhooks is not None \
                and config.webhook_format == "pusher":
            self.pusher_api.pusher.client_event_webhook = self.webhooks.client_event
        self.accepting = False
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
        if not self.accepting:
            return ["draining" if self._stop.is_set() else "starting"]
        return list(self.bus.health().down)

    def publish_figures(self) -> None:
        """Write this worker's row of the figures every worker shares."""
        figures: dict[str, float] = dict(self.hub.stats())
        figures["auth_failures_total"] = self.factory.auth_failures_total
        figures["connections_refused_total"] = self.factory.refused_full_total
        figures.update(self.bus.figures())
        if self.webhooks is not None:
            figures.update(self.webhooks.figures())
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
            self.loop.add_signal_handler(signum, self._stop.set)
        self.accepting = True
        # What the worker built to get here lives as long as it does: a full collection
        # (one comes every so many new connections) need not walk it. 45,000 objects after
        # the imports alone, 10-20 ms of a collection's pause, paid in every client's latency.
        gc.freeze()
        log.info("worker %d listening on %s:%d", self.placement.index, config.host, config.port)
        tasks = [self.loop.create_task(self._sweep_forever()),
                 self.loop.create_task(self._log_stats_forever())]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await self._shut_down(servers)

    async def _sweep_forever(self) -> None:
        config = self.config
        period = min(1.0, config.ping_interval / 2, config.ping_timeout / 4)
        while True:
            await asyncio.sleep(period)
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
        """Stop accepting, close every client with 1001, wait for them within the grace."""
        self.accepting = False
        for server in servers:
            server.close()
        if self.api is not None:
            self.api.close()
        if self.pusher_api is not None:
            self.pusher_api.http.close()
        self.hub.close_all(1001, "Server shutting down")
        deadline = self.loop.time() + self.config.shutdown_grace
        while self.hub.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.hub.connections:
            log.warning("shutdown grace over with %d connections open", self.hub.connections)
        await self.bus.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
        log.info("worker %d stopped", self.placement.index)


def run_worker(config: Config, placement: Placement, sockets: list[socket.socket],
               api_sockets: list[socket.socket]) -> None:
    async def main() -> None:
        await Worker(config, placement, sockets, api_sockets).serve()

    uvloop.run(main())
