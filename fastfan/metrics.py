"""Prometheus text for GET /metrics, from a worker's figures."""

from __future__ import annotations

import mmap
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ._core import LATENCY_BOUNDS
from .app import FAULT_CAUSES, HOOK_NAMES, hook_error_key


@dataclass(frozen=True)
class Metric:
    """One series of /metrics and the figure each worker keeps for it.

    `key` names the figure in Hub.stats() and the worker's row of shared figures; a
    series with `labels` is one labelled member of `name`'s family.
    """

    name: str
    kind: str  # "counter" or "gauge"
    help: str
    key: str
    labels: str = ""


# Every series but the latency histogram, declared once: the names are public, keep them
# exactly. The shared figures, the /metrics text and the tests all read this table.
METRICS = (
    Metric("fastfan_connections", "gauge", "Open WebSocket connections.", "connections"),
    Metric("fastfan_connections_total", "counter", "WebSocket connections accepted.",
           "connections_total"),
    Metric("fastfan_channels", "gauge", "Channels with at least one local subscriber.",
           "channels"),
    Metric("fastfan_subscriptions", "gauge", "Subscriptions held by connections.",
           "subscriptions"),
    Metric("fastfan_messages_received_total", "counter", "Client messages received.",
           "messages_received_total"),
    Metric("fastfan_deliveries_total", "counter", "Messages queued to subscribers.",
           "deliveries_total"),
    Metric("fastfan_bytes_sent_total", "counter", "Bytes written to connections.",
           "bytes_sent_total"),
    Metric("fastfan_slow_consumers_disconnected_total", "counter",
           "Connections closed with 4008 for not reading.", "slow_consumers_disconnected_total"),
    Metric("fastfan_backlog_bytes", "gauge",
           "Output queued for connections and not written yet: the server's own backlog.",
           "backlog_bytes"),
    Metric("fastfan_inputs_held_total", "counter",
           "Times a connection's input was held back because the backlog passed "
           "--max-backlog.", "inputs_held_total"),
    Metric("fastfan_auth_failures_total", "counter", "Upgrades refused with 401.",
           "auth_failures_total"),
    Metric("fastfan_connections_refused_total", "counter",
           "Upgrades refused with 503 at --max-connections or 429 at "
           "--max-connections-per-user.", "connections_refused_total"),
    Metric("fastfan_worker_restarts_total", "counter", "Workers the master replaced.",
           "worker_restarts_total"),
    Metric("fastfan_redis_up", "gauge", "1 when the Redis bus is connected.", "redis_up"),
    Metric("fastfan_redis_shards_down", "gauge",
           "Redis shards a worker is not connected to (--redis with several URLs).",
           "redis_shards_down"),
    Metric("fastfan_webhook_events_total", "counter",
           "Webhook events a receiver took (once per URL).", "webhook_events_total"),
    Metric("fastfan_webhook_failures_total", "counter",
           "Webhook requests that failed (non-2xx, timeout, refused), each retried.",
           "webhook_failures_total"),
    Metric("fastfan_webhook_dropped_total", "counter",
           "Webhook events never delivered: past --webhook-queue-bytes or --webhook-retry.",
           "webhook_dropped_total"),
    *(Metric("fastfan_dropped_total", "counter", "Messages not delivered, by reason.", key,
             f'reason="{reason}"')
      for reason, key in (("slow_consumer", "dropped_slow_total"),
                          ("conflated", "dropped_conflated_total"),
                          ("bus", "dropped_bus_total"),
                          ("invalid_payload", "dropped_invalid_total"),
                          ("overload", "dropped_overload_total"),
                          ("rate_limited", "publish_refused_total"))),
    *(Metric("fastfan_hook_errors_total", "counter",
             "Faults of the application's hooks (--app) and proxies, by hook and cause.",
             hook_error_key(hook, cause), f'hook="{hook}",cause="{cause}"')
      for hook in HOOK_NAMES for cause in FAULT_CAUSES),
)
# Gauges that are the whole server's when every worker has them, not their sum.
LEAST_OF_WORKERS = ("redis_up",)
# ... and those that are the most of any worker's.
MOST_OF_WORKERS = ("redis_shards_down",)


def _number(value: float) -> str:
    """Counters print as exact integers: `:g` would round 1234567 to 1.23457e+06."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render(figures: Mapping[str, float]) -> bytes:
    lines: list[str] = []
    described: set[str] = set()
    for metric in METRICS:
        if metric.name not in described:
            described.add(metric.name)
            lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}"]
        labels = f"{{{metric.labels}}}" if metric.labels else ""
        lines.append(f"{metric.name}{labels} {_number(figures.get(metric.key, 0))}")
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
    *(metric.key for metric in METRICS),
    *(f"latency_bucket_{i}" for i in range(len(LATENCY_BOUNDS) + 1)),
    "latency_sum", "latency_count",
)
# Figures that add up over a worker's life and survive it (the others are gauges).
CUMULATIVE = tuple(k for k in FIGURES if k.endswith("_total") or k.startswith("latency_"))
# Beside the figures, each row keeps when it was last written (time.time()): a rate is the
# difference of a row's counters over the difference of this, whenever one reads the rows.
WRITTEN_AT = "written_at"
_ROW = struct.Struct(f"{len(FIGURES) + 1}d")


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
        _ROW.pack_into(self._memory, row * _ROW.size, *(figures.get(k, 0) for k in FIGURES),
                       time.time())

    def read(self, row: int) -> dict[str, float]:
        return self._unpack(row)[0]

    def each(self) -> list[dict[str, float]]:
        """Every row with when it was written (WRITTEN_AT): one per worker, in slot order,
        then the master's."""
        return [{**figures, WRITTEN_AT: written_at}
                for figures, written_at in map(self._unpack, range(self.rows))]

    def _unpack(self, row: int) -> tuple[dict[str, float], float]:
        *values, written_at = _ROW.unpack_from(self._memory, row * _ROW.size)
        return dict(zip(FIGURES, values, strict=True)), written_at

    def total(self) -> dict[str, float]:
        return add_up(self.each())

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


def add_up(rows: list[dict[str, float]]) -> dict[str, float]:
    """The whole server's figures from every row of SharedFigures (the master's last)."""
    figures = {key: sum(row[key] for row in rows) for key in FIGURES}
    for key in LEAST_OF_WORKERS:  # e.g. Redis is up for the server when it is for all
        figures[key] = min(row[key] for row in rows[:-1])
    for key in MOST_OF_WORKERS:
        figures[key] = max(row[key] for row in rows[:-1])
    return figures
