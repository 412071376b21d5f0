"""Prometheus text for GET /metrics, from a worker's figures."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping

from ._core import LATENCY_BOUNDS

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
    ("fastfan_connections_refused_total", "counter",
     "Upgrades refused with 503 at --max-connections.", "connections_refused_total"),
    ("fastfan_worker_restarts_total", "counter", "Workers the master replaced.",
     "worker_restarts_total"),
    ("fastfan_redis_up", "gauge", "1 when the Redis bus is connected.", "redis_up"),
]

# fastfan_dropped_total{reason}: messages a subscriber did not get, by why.
_DROP_REASONS = [
    ("slow_consumer", "dropped_slow_total"),
    ("conflated", "dropped_conflated_total"),
    ("bus", "dropped_bus_total"),
    ("invalid_payload", "dropped_invalid_total"),
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
    lines += _histogram("fastfan_publish_latency_seconds",
                        "Seconds from a message's fan-out to its last local write.", figures)
    return ("\n".join(lines) + "\n").encode()


def _histogram(name: str, help_text: str, figures: Mapping[str, float]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    cumulative = 0.0
    for index, bound in enumerate([*map(repr, LATENCY_BOUNDS), "+Inf"]):
        cumulative += figures.get(f"latency_bucket_{index}", 0)
        lines.append(f'{name}_bucket{{le="{bound}"}} {_number(cumulative)}')
    lines.append(f"{name}_sum {_number(figures.get('latency_sum', 0))}")
    lines.append(f"{name}_count {_number(figures.get('latency_count', 0))}")
    return lines


def latency_figures(buckets: list[int], total: float, count: int) -> dict[str, float]:
    """A Histogram's state as shared figures."""
    figures = {f"latency_bucket_{i}": float(n) for i, n in enumerate(buckets)}
    figures.update(latency_sum=total, latency_count=float(count))
    return figures


# The figures every worker shares, in a fixed order: one row of float64 per worker in a
# shared anonymous mmap made by the master before it forks, plus one row of its own.
FIGURES = (
    "connections", "connections_total", "channels", "subscriptions",
    "messages_received_total", "deliveries_total", "bytes_sent_total", "dropped_slow_total",
    "dropped_conflated_total", "dropped_bus_total", "dropped_invalid_total",
    "slow_consumers_disconnected_total",
    "publish_refused_total", "auth_failures_total", "connections_refused_total",
    "worker_restarts_total", "redis_up",
    *(f"latency_bucket_{i}" for i in range(len(LATENCY_BOUNDS) + 1)),
    "latency_sum", "latency_count",
)
# Figures that add up over a worker's life and survive it (the others are gauges).
CUMULATIVE = tuple(k for k in FIGURES if k.endswith("_total") or k.startswith("latency_"))
_ROW = struct.Struct(f"{len(FIGURES)}d")


class SharedFigures:
    """Each worker writes its row; whoever answers /metrics adds every row up.

    The last row is the master's: worker restarts, and the totals of workers that died,
    so that counters do not go backwards when a worker is replaced.
    """

    def __init__(self, workers: int) -> None:
        self.rows = workers + 1
        self._memory = mmap.mmap(-1, _ROW.size * self.rows)

    @property
    def master_row(self) -> int:
        return self.rows - 1

    def write(self, row: int, figures: Mapping[str, float]) -> None:
        _ROW.pack_into(self._memory, row * _ROW.size, *(figures.get(k, 0) for k in FIGURES))

    def read(self, row: int) -> dict[str, float]:
        return dict(zip(FIGURES, _ROW.unpack_from(self._memory, row * _ROW.size), strict=True))

    def total(self) -> dict[str, float]:
        rows = [self.read(row) for row in range(self.rows)]
        figures = {key: sum(row[key] for row in rows) for key in FIGURES}
        # Redis is up for the server when it is up for every worker.
        figures["redis_up"] = min(row["redis_up"] for row in rows[:-1])
        return figures

    def retire(self, row: int) -> None:
        """A worker died: keep its counters in the master's row, forget its gauges."""
        dead, master = self.read(row), self.read(self.master_row)
        for key in CUMULATIVE:
            master[key] += dead[key]
        self.write(self.master_row, master)
        self.write(row, {})

    def count_restart(self) -> None:
        master = self.read(self.master_row)
        master["worker_restarts_total"] += 1
        self.write(self.master_row, master)
