"""A fleet into one backend, small (issue 13 §3; `benchmarks/fleet.py` is the full size).

Three node namespaces (helpers/netns.py), each with its daemon and one or two training
clients, deliver into one MLflow server in a backend namespace, each sink with its
adaptive concurrency. Midway the server is SIGKILLed and started again after
`OUTAGE` seconds, then node C's link is cut for `CUT` seconds. Meanwhile every
daemon's WAL holds what the server could not take; afterwards every point of every
run is in MLflow exactly once, and no client's `log()` waited anywhere near the outage.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest

from conftest import HEAVY, wait_for
from helpers.netns import Lab, NamespacedMlflow, Node, build_network, read_back, set_link

CLIENTS = {"a": 2, "b": 1, "c": 2}  # node -> training clients on it
ROWS = 3000
PACE = 1.0  # seconds per 100 rows: about 30 s of logging
OUTAGE = 8.0
CUT = 8.0
KEYS = ("i", "loss")

# four namespaces, an MLflow server, three daemons and five clients: one heavy test at a time
pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group(HEAVY)]


def run_names() -> list[str]:
    return sorted(f"{node}-{i}" for node, count in CLIENTS.items() for i in range(count))


def behind(nodes: dict[str, Node]) -> dict[str, dict[str, Any]]:
    """Each node's sink status, once every one has failed a call and holds records back."""
    sinks = {name: node.sink() for name, node in nodes.items()}
    if all(sink["retries"] > 0 and sink["lag_records"] > 0 for sink in sinks.values()):
        return sinks
    return {}


def test_a_fleet_outlives_a_server_restart_and_a_cut_link_with_every_point_once(
    lab: Lab, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Server killed and restarted, a link cut: each point once, log() never waited."""
    spaces = build_network(lab, list(CLIENTS))
    server = NamespacedMlflow(lab, spaces, env)
    server.start(probe_from="a")
    nodes = {name: Node(lab, name, spaces[name], server.env) for name in CLIENTS}
    for node in nodes.values():
        node.serve("--sink", f"mlflow:{server.uri}")
    for name, node in nodes.items():
        for i in range(CLIENTS[name]):
            node.log_run("fleet", f"{name}-{i}", ROWS, PACE)
    wait_for(lambda: all(node.sink()["delivered_rows"] > 0 for node in nodes.values()), 90)

    server.kill()
    down_at = time.monotonic()
    during = wait_for(lambda: behind(nodes), timeout=OUTAGE * 4)
    wal = {name: node.request("status")["wal"]["bytes"] for name, node in nodes.items()}
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))  # the outage's length
    server.start(probe_from="b")
    outage = time.monotonic() - down_at

    c = nodes["c"]
    retries_before_cut = c.sink()["retries"]
    set_link(lab, spaces, "c", up=False)
    cut_at = time.monotonic()
    wait_for(lambda: c.sink()["retries"] > retries_before_cut, timeout=CUT * 4)
    time.sleep(max(0.0, CUT - (time.monotonic() - cut_at)))
    cut_lag = c.sink()["lag_records"]
    set_link(lab, spaces, "c", up=True)

    results = {}
    for node in nodes.values():
        results.update(node.client_results(timeout=180))
    for node in nodes.values():
        assert node.request("flush", timeout=185, wait=180), f"node {node.name} did not catch up"
        sink = node.sink()
        assert sink["dead_letters"] == 0
        assert sink["lag_records"] == 0
        assert sink["concurrency"]["mode"] == "adaptive"
        assert 1 <= sink["concurrency"]["limit"] <= sink["concurrency"]["ceiling"]

    assert all(sink["lag_records"] > 0 for sink in during.values()), "each WAL held the backlog"
    assert cut_lag > 0, "node C fell behind while its link was down"
    runs = read_back(lab, spaces["a"], server.uri, "fleet", KEYS, server.env)
    assert sorted(runs) == run_names()
    for name, found in runs.items():
        (run,) = found  # one MLflow run per trackd run
        for key in KEYS:
            steps = sorted(step for step, _ in run["history"][key])
            assert steps == list(range(ROWS)), f"{name}: {key} not every step exactly once"
        assert run["status"] == "FINISHED"
    worst = {name: result["worst_log_seconds"] for name, result in results.items()}
    assert max(worst.values()) < min(0.5, outage / 10), f"a log() call waited: {worst}"
    figures = {
        "outage_seconds": round(outage, 1),
        "cut_seconds": CUT,
        "lag_records_in_outage": {name: sink["lag_records"] for name, sink in during.items()},
        "wal_bytes_in_outage": wal,
        "c_lag_records_at_reconnect": cut_lag,
        "retries": {name: node.sink()["retries"] for name, node in nodes.items()},
        "concurrency": {name: node.sink()["concurrency"] for name, node in nodes.items()},
        "worst_log_seconds": worst,
    }
    with capsys.disabled():
        print(f"\n[fleet] {json.dumps(figures)}", flush=True)
    for node in nodes.values():
        assert node.daemon is not None
        assert lab.end(node.daemon, signal.SIGTERM) == 0
