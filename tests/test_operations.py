"""What an operator relies on: metrics a Prometheus parser reads, limits, stats, logs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.server import Server, token
from support.waiting import wait_for
from support.wire import HandshakeRefusedError, RawClient

CONTRACT_METRICS = {
    "fastfan_connections", "fastfan_connections_total", "fastfan_channels",
    "fastfan_subscriptions", "fastfan_messages_received_total", "fastfan_deliveries_total",
    "fastfan_bytes_sent_total", "fastfan_dropped_total",
    "fastfan_slow_consumers_disconnected_total", "fastfan_auth_failures_total",
    "fastfan_worker_restarts_total", "fastfan_redis_up", "fastfan_publish_latency_seconds",
}


def families(server: Server) -> list[Any]:
    _, _, body = server.get("/metrics")
    return list(text_string_to_metric_families(body.decode()))


def test_metrics_parse_as_prometheus_text_with_every_contract_figure(server: Server) -> None:
    subscriber, publisher = server.connect().subscribe("p"), server.connect()
    for i in range(10):
        publisher.publish("p", i)
    assert [subscriber.recv_json()["data"] for _ in range(10)] == list(range(10))
    found = families(server)
    # The parser names counters without their _total suffix (so the gauge
    # fastfan_connections and the counter fastfan_connections_total share a family name).
    names = {f.name + ("_total" if f.type == "counter" else "") for f in found}
    assert names >= CONTRACT_METRICS
    by_name = {f.name: f for f in found if f.type != "gauge"}
    latency = by_name["fastfan_publish_latency_seconds"]
    assert latency.type == "histogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in latency.samples}
    assert samples[("fastfan_publish_latency_seconds_count", None)] == 10
    assert samples[("fastfan_publish_latency_seconds_bucket", "+Inf")] == 10
    assert 0 < samples[("fastfan_publish_latency_seconds_sum", None)] < 10
    reasons = {s.labels["reason"] for s in by_name["fastfan_dropped"].samples}
    assert {"slow_consumer", "conflated"} <= reasons


def test_connection_cap_answers_503(start_server: Any) -> None:
    server = start_server("--max-connections", "2")
    first, second = server.connect(), server.connect()
    try:
        RawClient(server.host, server.port, f"/?token={token()}")
    except HandshakeRefusedError as refused:
        assert refused.status == 503
        assert refused.body.startswith(b"503 Service Unavailable: connection limit")
    else:
        raise AssertionError("a third connection was accepted")
    first.close()
    wait_for(lambda: server.metrics()["fastfan_connections"] == 1)
    server.connect().close()  # room again
    second.close()
    assert server.metrics()["fastfan_connections_refused_total"] == 1


def test_the_1025th_subscription_is_refused_by_default(server: Server) -> None:
    client = server.connect()
    for n in range(1024):
        client.send_json({"type": "subscribe", "channel": f"c{n}"})
    replies = [client.recv_json() for _ in range(1024)]
    assert all(r["type"] == "subscribed" for r in replies)
    client.send_json({"type": "subscribe", "channel": "one-too-many", "id": 1025})
    refused = client.recv_json()
    assert (refused["type"], refused["code"], refused["id"]) == ("error", 429, 1025)
    assert server.metrics()["fastfan_subscriptions"] == 1024


@pytest.mark.slow
def test_json_logs_and_the_per_minute_stats_line(start_server: Any) -> None:
    server = start_server("--log-format", "json", "--stats-interval", "0.5", "--workers", "2")
    clients = [server.connect() for _ in range(20)]
    for client in clients:
        client.send_json({"type": "ping"})
        assert client.recv_json() == {"type": "pong"}

    def stats_lines() -> list[dict[str, Any]]:
        return [line["stats"] for line in map(json.loads, server.log().splitlines())
                if "stats" in line]

    # until the stats lines (every 0.5 s, each worker's) have counted the 20
    wait_for(lambda: sum(s["count"] for s in stats_lines()) >= 20)
    lines = [json.loads(line) for line in server.log().splitlines()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    stats = [line["stats"] for line in lines if "stats" in line]
    assert {"count", "min_ms", "max_ms", "avg_ms", "p95_ms", "p99_ms"} <= set(stats[0])
    assert sum(s["count"] for s in stats) == 20
    assert all(s["min_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"]
               for s in stats if s["count"])
    # nothing per connection or per message at info
    assert not [line for line in lines if "stats" not in line and line["logger"] != "fastfan.master"
                and "listening" not in line["message"]]
