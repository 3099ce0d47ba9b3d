"""`--metrics-addr`: Prometheus text exposition of the status figures."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import Daemon, finish_client, free_port, run_client


def test_metrics_endpoint_reports_the_status_figures(daemon: Daemon, env: dict[str, str]) -> None:
    """The scrape shows rows ingested, WAL size and per-sink delivery, as status does."""
    port = free_port()
    daemon.start("--metrics-addr", f"127.0.0.1:{port}")
    finish_client(run_client(env, "--name", "scraped", "--rows", "1500"))
    daemon.flush()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    status = daemon.status()
    assert samples[("trackd_ingest_rows_total", ())] == 1500
    assert samples[("trackd_wal_bytes", ())] == status["wal"]["bytes"]
    sink = next(iter(status["sinks"].values()))["spec"]
    assert samples[("trackd_sink_delivered_rows_total", (("sink", sink),))] == 1500
    assert samples[("trackd_sink_lag_bytes", (("sink", sink),))] == 0
    assert samples[("trackd_runs", (("state", "total"),))] == 1


def test_bad_metrics_address_exits_2_with_one_line(env: dict[str, str]) -> None:
    """A metrics address that is not HOST:PORT is refused before anything starts."""
    result = subprocess.run(
        [sys.executable, "-m", "trackd", "serve", "--metrics-addr", "nonsense"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "trackd: metrics_addr: expected HOST:PORT, got 'nonsense'"
    ]
