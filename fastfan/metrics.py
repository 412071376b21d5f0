"""Prometheus text for GET /metrics, from a worker's figures."""

from __future__ import annotations

from collections.abc import Mapping

# (name, type, help, key in the figures); the names are public: keep them exactly.
_SERIES = [
    ("fastfan_connections", "gauge", "Open WebSocket connections.", "connections"),
    ("fastfan_connections_total", "counter", "WebSocket connections accepted.",
     "connections_total"),
    ("fastfan_channels", "gauge", "Channels with at least one local subscriber.", "channels"),
    ("fastfan_subscriptions", "gauge", "Subscriptions held by connections.", "subscriptions"),
    ("fastfan_messages_received_total", "counter", "Client messages received.",
     "messages_received_total"),
    ("fastfan_deliveries_total", "counter", "Messages queued to subscribers.",
     "deliveries_total"),
    ("fastfan_bytes_sent_total", "counter", "Bytes written to connections.", "bytes_sent_total"),
    ("fastfan_slow_consumers_disconnected_total", "counter",
     "Connections closed with 4008 for not reading.", "slow_consumers_disconnected_total"),
    ("fastfan_auth_failures_total", "counter", "Upgrades refused with 401.",
     "auth_failures_total"),
    ("fastfan_worker_restarts_total", "counter", "Workers the master replaced.",
     "worker_restarts_total"),
    ("fastfan_redis_up", "gauge", "1 when the Redis bus is connected.", "redis_up"),
]

# fastfan_dropped_total{reason}: messages a subscriber did not get, by why.
_DROP_REASONS = [
    ("slow_consumer", "dropped_slow_total"),
    ("conflated", "dropped_conflated_total"),
    ("rate_limited", "publish_refused_total"),
]


def _number(value: float) -> str:
    """Counters print as exact integers: `:g` would round 1234567 to 1.23457e+06."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render(figures: Mapping[str, float]) -> bytes:
    lines: list[str] = []
    for name, kind, help_text, key in _SERIES:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                  f"{name} {_number(figures.get(key, 0))}"]
    lines += ["# HELP fastfan_dropped_total Messages not delivered, by reason.",
              "# TYPE fastfan_dropped_total counter"]
    lines += [f'fastfan_dropped_total{{reason="{reason}"}} {_number(figures.get(key, 0))}'
              for reason, key in _DROP_REASONS]
    return ("\n".join(lines) + "\n").encode()
