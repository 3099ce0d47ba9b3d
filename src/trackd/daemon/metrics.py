"""Prometheus text exposition of the same figures as `trackd status` (`--metrics-addr`).

A custom collector reads the status at scrape time, so there is one source of
truth and nothing to keep in step. prometheus-client serves it from its own
thread; the status it reads is plain counters and sizes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry


class StatusCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        status = self._status()
        ingest, wal = status["ingest"], status["wal"]
        yield GaugeMetricFamily(
            "trackd_uptime_seconds", "Seconds since the daemon started.", value=status["uptime"]
        )
        for name, help_text in (
            ("messages", "Messages made durable."),
            ("rows", "Metric rows made durable."),
            ("bytes", "Bytes of messages made durable."),
            ("duplicates", "Re-sent messages stored once."),
            ("blocked", "Messages turned away while the WAL was full."),
        ):
            yield CounterMetricFamily(f"trackd_ingest_{name}", help_text, value=ingest[name])
        yield GaugeMetricFamily(
            "trackd_ingest_rows_per_second",
            "Rows per second, last 10 s.",
            value=ingest["rows_per_second"],
        )
        errors = CounterMetricFamily("trackd_ingest_errors", "Refused frames.", labels=["kind"])
        for kind, count in ingest["errors"].items():
            errors.add_metric([kind], count)
        yield errors
        yield GaugeMetricFamily("trackd_wal_bytes", "Bytes in the WAL.", value=wal["bytes"])
        yield GaugeMetricFamily("trackd_wal_segments", "WAL segments.", value=wal["segments"])
        yield GaugeMetricFamily(
            "trackd_wal_blocked",
            "1 while ingest is blocked by the budget.",
            value=int(wal["blocked"]),
        )
        yield CounterMetricFamily(
            "trackd_wal_dropped_rows", "Rows dropped by drop_oldest.", value=wal["dropped_rows"]
        )
        runs = GaugeMetricFamily("trackd_runs", "Runs known to the daemon.", labels=["state"])
        runs.add_metric(["running"], status["runs"]["running"])
        runs.add_metric(["total"], status["runs"]["total"])
        yield runs
        yield from _sink_metrics(status["sinks"])
        yield from _system_metrics(status.get("system", {}))


def _sink_metrics(sinks: dict[str, dict[str, Any]]) -> Iterator[Any]:
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        "lag_bytes": GaugeMetricFamily(
            "trackd_sink_lag_bytes", "WAL bytes not yet delivered.", labels=["sink"]
        ),
        "lag_seconds": GaugeMetricFamily(
            "trackd_sink_lag_seconds", "Seconds behind.", labels=["sink"]
        ),
        "delivered_rows": CounterMetricFamily(
            "trackd_sink_delivered_rows", "Rows delivered.", labels=["sink"]
        ),
        "retries": CounterMetricFamily("trackd_sink_retries", "Failed attempts.", labels=["sink"]),
        "dead_letters": CounterMetricFamily(
            "trackd_sink_dead_letters", "Records given up on.", labels=["sink"]
        ),
    }
    calls = {
        "limit": GaugeMetricFamily(
            "trackd_sink_concurrency_limit", "Calls allowed in flight now.", labels=["sink"]
        ),
        "ceiling": GaugeMetricFamily(
            "trackd_sink_concurrency_ceiling", "Most calls in flight.", labels=["sink"]
        ),
        "in_flight": GaugeMetricFamily(
            "trackd_sink_concurrency_in_flight", "Calls in flight.", labels=["sink"]
        ),
    }
    for sink in sinks.values():
        for field, family in families.items():
            family.add_metric([sink["spec"]], sink[field])
        for field, gauge in calls.items():
            if sink.get("concurrency"):
                gauge.add_metric([sink["spec"]], sink["concurrency"][field])
    yield from families.values()
    yield from calls.values()


def _system_metrics(system: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    """The latest node sample: `trackd_system_NAME{node=...}`, "." in a name as "_"
    (`gpu.0.util` -> `trackd_system_gpu_0_util`)."""
    latest = system.get("latest")
    if not latest:
        return
    for name, value in sorted(latest["values"].items()):
        family = GaugeMetricFamily(
            f"trackd_system_{_METRIC_UNSAFE.sub('_', name)}",
            f"Latest system sample: {name}.",
            labels=["node"],
        )
        family.add_metric([latest["node"]], value)
        yield family


_METRIC_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def serve(address: str, status: Callable[[], dict[str, Any]]) -> None:
    """Serve /metrics on HOST:PORT from a background thread."""
    from prometheus_client import start_http_server

    host, _, port = address.rpartition(":")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
