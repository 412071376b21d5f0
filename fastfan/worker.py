"""One worker process: the loop, the picows server, the bus and the metrics wired together."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import uvloop
from picows import ws_create_server

from . import metrics
from ._core import Hub
from .bus.local import LocalBus
from .config import Config
from .handshake import ListenerFactory
from .logs import PicowsLog

log = logging.getLogger("fastfan.worker")

# The kernel caps the accept queue at net.core.somaxconn (4096 here). picows's default of
# 100 turns a burst of thousands of connects into SYN retries that take over a minute.
LISTEN_BACKLOG = 65535
# picows's read buffer starts here and grows with the largest frame; 16 KiB by default
# costs idle connections memory for nothing, as client messages are small.
READ_BUFFER_INIT_SIZE = 2048
# A client that opens a TCP connection but sends no upgrade request in time is dropped.
HANDSHAKE_TIMEOUT = 5.0


class Worker:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.hub = Hub(
            self.loop,
            max_message_size=config.max_message_size,
            max_subscriptions=config.max_subscriptions,
            max_buffer=config.max_buffer,
            publish_rate=float(config.publish_rate),
            slow_consumer=config.slow_consumer,
        )
        self.bus = LocalBus(self.hub)
        self.hub.bus = self.bus
        self.accepting = False
        self.factory = ListenerFactory(config, self.hub, is_ready=self.is_ready,
                                       metrics=self.render_metrics)
        self._stop = asyncio.Event()

    def is_ready(self) -> bool:
        return self.accepting and self.bus.up

    def figures(self) -> dict[str, float]:
        figures: dict[str, float] = dict(self.hub.stats())
        figures["auth_failures_total"] = self.factory.auth_failures_total
        return figures

    def render_metrics(self) -> bytes:
        return metrics.render(self.figures())

    async def serve(self, sock: socket.socket | None = None) -> None:
        config = self.config
        where = {"sock": sock} if sock is not None else {"host": config.host, "port": config.port}
        server = await ws_create_server(
            self.factory,
            **where,
            backlog=LISTEN_BACKLOG,
            logger_name=PicowsLog(),
            use_aiofastnet=False,
            enable_auto_pong=False,  # Session answers pings itself (RSV checks, ordering)
            max_frame_size=config.max_message_size,
            read_buffer_init_size=READ_BUFFER_INIT_SIZE,
            websocket_handshake_timeout=HANDSHAKE_TIMEOUT,
        )
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self._stop.set)
        self.accepting = True
        port = server.sockets[0].getsockname()[1]
        log.info("worker listening on %s:%d", config.host, port)
        sweeper = self.loop.create_task(self._sweep_forever())
        await self._stop.wait()
        sweeper.cancel()
        await self._shut_down(server)

    async def _sweep_forever(self) -> None:
        config = self.config
        period = min(1.0, config.ping_interval / 2, config.ping_timeout / 4)
        while True:
            await asyncio.sleep(period)
            self.hub.sweep(config.ping_interval, config.ping_timeout)

    async def _shut_down(self, server: asyncio.AbstractServer) -> None:
        """Stop accepting, close every client with 1001, wait for them within the grace."""
        self.accepting = False
        server.close()
        self.hub.close_all(1001, "Server shutting down")
        deadline = self.loop.time() + self.config.shutdown_grace
        while self.hub.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.hub.connections:
            log.warning("shutdown grace over with %d connections open", self.hub.connections)
        log.info("worker stopped")


def run_worker(config: Config, sock: socket.socket | None = None) -> None:
    async def main() -> None:
        await Worker(config).serve(sock)

    uvloop.run(main())
