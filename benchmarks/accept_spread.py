"""How evenly do forked workers share incoming connections?

    python benchmarks/accept_spread.py --workers 6 --connections 6000

Compares the two ways workers can accept on one port: a listening socket made before the
fork and shared by all (each worker's uvloop polls it), and SO_REUSEPORT, where each worker
binds its own socket and the kernel hashes connections over them. Prints connections per
worker for each. fastfan uses SO_REUSEPORT (see README).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time

import uvloop


def serve(sock: socket.socket | None, port: int, counter_fd: int) -> None:
    """A worker: accept connections, count them, write the count when told to stop."""
    accepted = 0

    class Count(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            nonlocal accepted
            accepted += 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        if sock is not None:
            server = await loop.create_server(Count, sock=sock)
        else:
            server = await loop.create_server(Count, "127.0.0.1", port, reuse_port=True,
                                              backlog=4096)
        async with server:
            await stop.wait()
        os.write(counter_fd, f"{accepted}\n".encode())

    uvloop.run(main())


def measure(shared: bool, workers: int, connections: int) -> list[int]:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
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
            serve(sock, port, write_end)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--connections", type=int, default=6000)
    args = parser.parse_args()
    for name, shared in (("shared socket", True), ("SO_REUSEPORT", False)):
        counts = measure(shared, args.workers, args.connections)
        spread = (max(counts) - min(counts)) / (args.connections / args.workers)
        print(f"{name:>14}: per worker {counts}; max-min = {spread:.0%} of the mean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
