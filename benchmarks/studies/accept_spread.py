"""How evenly forked workers share incoming connections: a shared socket or SO_REUSEPORT.

    ./dev bench --scenarios accept-spread --workers 6 --connections 6000
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Any

from lib import free_port


def _count_accepts(sock: socket.socket | None, port: int, counter_fd: int) -> None:
    """A forked worker: accept connections, count them, write the count when told to stop."""
    import uvloop

    accepted = 0

    class Count(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            nonlocal accepted
            accepted += 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        if sock is not None:
            server = await loop.create_server(Count, sock=sock)
        else:
            server = await loop.create_server(Count, "127.0.0.1", port, reuse_port=True,
                                              backlog=4096)
        async with server:
            await stopped.wait()
        os.write(counter_fd, f"{accepted}\n".encode())

    uvloop.run(main())


def _spread(shared: bool, workers: int, connections: int) -> list[int]:
    port = free_port()
    sock = None
    if shared:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(4096)
    read_end, write_end = os.pipe()
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _count_accepts(sock, port, write_end)
            os._exit(0)
        pids.append(pid)
    os.close(write_end)
    time.sleep(1.0)
    clients = []
    for _ in range(connections):
        clients.append(socket.create_connection(("127.0.0.1", port)))
        if len(clients) % 200 == 0:
            time.sleep(0.01)  # arrivals spread in time, as real clients come
    time.sleep(1.0)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    for pid in pids:
        os.waitpid(pid, 0)
    with os.fdopen(read_end) as counts:
        result = sorted(int(line) for line in counts)
    for client in clients:
        client.close()
    return result


def accept_spread(workers: int = 6, connections: int = 6000) -> list[dict[str, Any]]:
    """How evenly do forked workers share incoming connections? A listening socket made
    before the fork and shared by all (each worker's uvloop polls it), against
    SO_REUSEPORT (each worker binds its own; the kernel hashes connections over them),
    which fastfan uses. Connections per worker for each."""
    rows = []
    print(f"\naccept-spread: {connections} connections over {workers} workers")
    for name, shared in (("shared socket", True), ("SO_REUSEPORT", False)):
        counts = _spread(shared, workers, connections)
        spread = (max(counts) - min(counts)) / (connections / workers)
        rows.append({"scenario": "accept-spread", "listener": name, "per_worker": counts})
        print(f"{name:>14}: per worker {counts}; max-min = {spread:.0%} of the mean", flush=True)
    return rows
