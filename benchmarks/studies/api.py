"""Publishes/s through the server API (HTTP) against a WebSocket publisher.

    ./dev bench --scenarios api --subscribers 1000 --duration 3
"""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Any

from lib import Subscribers, cpu_seconds, free_port, metrics, start_fastfan, subscriber

from .common import NO_HEARTBEAT, stop

API_KEY = "benchmark-api-key"
IN_FLIGHT = 16  # requests ahead of their answers, in the pipelined runs


def _api_publish(seq: int) -> bytes:
    body = json.dumps({"channel": "crowd", "data": _data(seq)}).encode()
    return (b"POST /api/publish HTTP/1.1\r\nHost: bench\r\nAuthorization: apikey "
            + API_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def _ws_publish(seq: int) -> dict[str, Any]:
    return {"type": "publish", "channel": "crowd", "data": _data(seq), "id": seq}


def _data(seq: int) -> dict[str, Any]:
    """What loadgen's subscribers check: seq in order, ts for the latency (both clocks are
    CLOCK_MONOTONIC), about 100 bytes in all."""
    return {"seq": seq, "ts": time.monotonic_ns(), "pad": "x" * 48}


def _through_api(port: int, first: int, duration: float, in_flight: int) -> int:
    """Publishes through one keep-alive API connection for `duration` s, `in_flight` of
    them ahead of their answers; how many were answered 200."""
    answer = b'{"result":{}}'
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = answered = 0
        buffer = b""
        stop_at = time.monotonic() + duration
        while True:
            sending = time.monotonic() < stop_at
            if sending and sent - answered < in_flight:
                batch = in_flight - (sent - answered)
                sock.sendall(b"".join(_api_publish(first + sent + k)
                                      for k in range(batch)))
                sent += batch
            if answered == sent and not sending:
                return answered
            buffer += sock.recv(65536)
            if re.search(rb"HTTP/1\.1 (?!200)\d{3}", buffer):
                raise RuntimeError(f"the API refused a publish: {buffer[:300]!r}")
            done = buffer.count(answer)
            answered += done
            buffer = buffer[buffer.rfind(answer) + len(answer):] if done else buffer


def _through_websocket(port: int, first: int, duration: float, in_flight: int) -> int:
    """The same through one WebSocket connection: publishes with an `id`, `in_flight`
    ahead of their `published` replies; how many were answered."""
    client = subscriber(port, "none.publisher", timeout=30)
    sent = answered = 0
    stop_at = time.monotonic() + duration
    try:
        while True:
            sending = time.monotonic() < stop_at
            if sending and sent - answered < in_flight:
                batch = in_flight - (sent - answered)
                client.send_json_burst([_ws_publish(first + sent + k) for k in range(batch)])
                sent += batch
            if answered == sent and not sending:
                return answered
            reply = client.recv_json()
            if reply["type"] != "published":
                raise RuntimeError(f"a WebSocket publish failed: {reply}")
            answered += 1
    finally:
        client.close()


def api(subscribers: int = 1000, duration: float = 3.0) -> list[dict[str, Any]]:
    """Publishes/s into a channel of `subscribers` from one keep-alive server API client
    (HTTP/1.1, one request at a time, then IN_FLIGHT pipelined), against one WebSocket
    publisher doing the same (an `id` on each publish, waiting for `published`), one
    worker; with the server's CPU per publish and the deliveries each run made."""
    port, api_port = free_port(), free_port()
    server = start_fastfan(port, ["--api-port", str(api_port), "--api-key", API_KEY,
                                  *NO_HEARTBEAT])
    rows = []
    seq = 0
    try:
        with Subscribers([port], subs=subscribers, channel="crowd", duration=1,
                         drain=3) as subs:
            subs.ready()
            subs.go()
            runs = [("api", _through_api, api_port, 1),
                    ("api", _through_api, api_port, IN_FLIGHT),
                    ("websocket", _through_websocket, port, 1),
                    ("websocket", _through_websocket, port, IN_FLIGHT)]
            for via, publish, target, in_flight in runs:
                before, cpu_before = metrics(port), cpu_seconds(server.pid)
                started = time.monotonic()
                published = publish(target, seq, duration, in_flight)
                elapsed = time.monotonic() - started
                time.sleep(0.5)  # the last fan-outs are written
                after, cpu_after = metrics(port), cpu_seconds(server.pid)
                seq += published
                deliveries = (after["fastfan_deliveries_total"]
                              - before["fastfan_deliveries_total"])
                row = {"scenario": "api", "via": via, "in_flight": in_flight,
                       "subscribers": subscribers, "publishes": published,
                       "publishes_per_s": round(published / elapsed),
                       "deliveries_per_s": round(deliveries / elapsed),
                       "server_cpu_us_per_publish":
                           round((cpu_after - cpu_before) / published * 1e6, 1)}
                print(f"\napi: {row}", flush=True)
                rows.append(row)
            reports = subs.reports()
    finally:
        stop(server)
    delivered = sum(r["delivered"] for r in reports)
    for row in rows:
        row["lost_in_all_runs"] = seq * subscribers - delivered
    print(f"\napi: {seq} publishes in all, {seq * subscribers - delivered} deliveries lost",
          flush=True)
    return rows
