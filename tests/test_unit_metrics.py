"""The figures behind /metrics: shared by forked workers, kept through a worker's death, and
rendered as text a Prometheus parser reads, every figure under its own name."""

from __future__ import annotations

import os

from prometheus_client.parser import text_string_to_metric_families

from fastfan.app import FAULT_CAUSES, HOOK_NAMES, hook_error_key
from fastfan.metrics import CUMULATIVE, FIGURES, SharedFigures, latency_figures, render

# fastfan_dropped_total{reason}: the label each figure is exported under (the contract's).
DROP_REASONS = {"slow_consumer": "dropped_slow_total", "conflated": "dropped_conflated_total",
                "bus": "dropped_bus_total", "invalid_payload": "dropped_invalid_total",
                "rate_limited": "publish_refused_total", "overload": "dropped_overload_total"}
BUCKETS = sum(key.startswith("latency_bucket_") for key in FIGURES)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample a Prometheus parser reads in `text`: (name, labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples}


def test_a_forked_workers_row_is_read_by_its_parent() -> None:
    shared = SharedFigures(2)
    pid = os.fork()
    if pid == 0:  # the child only writes its row and leaves, as a worker would
        try:
            shared.write(1, {"connections": 3, "deliveries_total": 7})
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert shared.read(1)["connections"] == 3
    assert shared.total()["deliveries_total"] == 7


def test_retire_keeps_a_dead_workers_counters_and_forgets_its_gauges() -> None:
    shared = SharedFigures(2)
    shared.write(0, {"connections": 5, "channels": 3, "connections_total": 40,
                     "deliveries_total": 900, "latency_bucket_2": 12, "latency_count": 12,
                     "latency_sum": 0.5})
    shared.write(1, {"connections": 2, "connections_total": 10})
    shared.count_restart()
    before = shared.total()
    shared.retire(0)
    after = shared.total()
    assert {key: after[key] for key in CUMULATIVE} == {key: before[key] for key in CUMULATIVE}
    assert (after["connections"], after["channels"]) == (2, 0)
    assert set(shared.read(0).values()) == {0}
    assert after["worker_restarts_total"] == 1
    shared.write(0, {"connections_total": 1})  # the replacement, which dies in turn
    shared.retire(0)
    assert shared.total()["connections_total"] == 51


def test_redis_is_up_only_when_it_is_up_for_every_worker() -> None:
    shared = SharedFigures(2)  # the master's row never has redis_up, and does not count
    shared.write(0, {"redis_up": 1})
    shared.write(1, {"redis_up": 1})
    assert shared.total()["redis_up"] == 1
    shared.write(1, {"redis_up": 0})
    assert shared.total()["redis_up"] == 0


def test_every_figure_is_rendered_under_its_name_with_its_value() -> None:
    figures = {key: float(n + 1) for n, key in enumerate(FIGURES)}
    read = samples(render(figures))
    plain = {name.removeprefix("fastfan_"): value for (name, labels), value in read.items()
             if not labels and "latency" not in name}
    dropped = {dict(labels)["reason"]: value for (name, labels), value in read.items()
               if name == "fastfan_dropped_total"}
    assert plain == {key: figures[key] for key in plain}
    assert dropped == {reason: figures[key] for reason, key in DROP_REASONS.items()}
    hook_errors = {(dict(labels)["hook"], dict(labels)["cause"]): value
                   for (name, labels), value in read.items()
                   if name == "fastfan_hook_errors_total"}
    faults = {(hook, cause): hook_error_key(hook, cause)
              for hook in HOOK_NAMES for cause in FAULT_CAUSES}
    assert hook_errors == {fault: figures[key] for fault, key in faults.items()}
    exported = set(plain) | set(DROP_REASONS.values()) | set(faults.values())
    assert exported | {k for k in FIGURES if k.startswith("latency_")} == set(FIGURES)


def test_counters_print_as_exact_integers() -> None:
    text = render({"connections_total": 1234567.0, "bytes_sent_total": float(2**53 - 1),
                   "latency_sum": 0.25})
    assert b"\nfastfan_connections_total 1234567\n" in text
    assert b"\nfastfan_bytes_sent_total 9007199254740991\n" in text
    assert b"\nfastfan_publish_latency_seconds_sum 0.25\n" in text
    assert samples(text)[("fastfan_bytes_sent_total", ())] == 2**53 - 1


def test_the_latency_histogram_is_cumulative_and_ends_at_the_count() -> None:
    counts = [n % 3 for n in range(BUCKETS)]
    read = samples(render(latency_figures(counts, 0.125, sum(counts))))
    buckets = sorted((float(dict(labels)["le"]), value) for (name, labels), value in read.items()
                     if name == "fastfan_publish_latency_seconds_bucket")
    assert len(buckets) == BUCKETS and buckets[-1][0] == float("inf")
    assert [value for _, value in buckets] == [sum(counts[:n + 1]) for n in range(BUCKETS)]
    assert read[("fastfan_publish_latency_seconds_count", ())] == sum(counts)
    assert read[("fastfan_publish_latency_seconds_sum", ())] == 0.125


def test_no_figures_render_as_zeros_that_still_parse() -> None:
    read = samples(render({}))
    assert read and set(read.values()) == {0}
