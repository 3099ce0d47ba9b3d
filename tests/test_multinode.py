"""Multi-node on one machine: two node-local daemons deliver into one central MLflow server.

Three network namespaces made by the test (helpers/netns.py): two "nodes" and a
"backend" with the MLflow server; each node runs `trackd serve` and a training
client. Mid-run node A's switch port is set down for 30 s, so its daemon sees a
dead network (timeouts, not refusals) while node B carries on. Afterwards both
runs are read back from the MLflow server (from inside a node namespace): every
step once in each.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from conftest import HEAVY, wait_for
from helpers.netns import Lab, NamespacedMlflow, Node, build_network, read_back, set_link

ROWS = 6000
PACE = 0.9  # seconds per 100 rows: about 55 s of logging
CUT_SECONDS = 30.0

# three namespaces, an MLflow server and two daemons: one heavy test at a time
pytestmark = [pytest.mark.timeout(240), pytest.mark.xdist_group(HEAVY)]


def test_two_nodes_one_mlflow_link_cut_for_30s_everything_arrives_once(
    lab: Lab, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Node A's link down for 30 s mid-run: both nodes' runs reach MLflow whole, each step once."""
    spaces = build_network(lab, ["a", "b"])
    server = NamespacedMlflow(lab, spaces, env)
    server.start(probe_from="a")  # across the bridge
    uri, env = server.uri, server.env

    nodes = {name: Node(lab, name, spaces[name], env) for name in ("a", "b")}
    for node in nodes.values():
        node.serve("--sink", f"mlflow:{uri}")
    for name, node in nodes.items():
        node.log_run("multinode", f"node-{name}", ROWS, PACE)
    a, b = nodes["a"], nodes["b"]
    wait_for(lambda: a.sink()["delivered_rows"] > 0 and b.sink()["delivered_rows"] > 0, 60)

    set_link(lab, spaces, "a", up=False)  # node A's cable pulled
    cut_at = time.monotonic()
    b_before = b.sink()["delivered_rows"]
    failing = wait_for(lambda: (sink := a.sink())["retries"] > 0 and sink, timeout=CUT_SECONDS)
    assert failing["last_error"], "node A's status says why MLflow is behind"
    time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
    during_a, during_b = a.sink(), b.sink()
    set_link(lab, spaces, "a", up=True)
    assert all(c.poll() is None for node in nodes.values() for c in node.clients.values()), (
        "the runs should still be logging when the link comes back"
    )
    assert during_a["lag_records"] > 0, "node A's sink falls behind while its link is down"
    assert during_b["delivered_rows"] > b_before, "node B keeps delivering meanwhile"

    results = {
        name: node.client_results(timeout=120)[f"node-{name}"] for name, node in nodes.items()
    }
    for node in nodes.values():
        assert node.request("flush", timeout=125, wait=120), f"node {node.name} did not catch up"
        assert node.sink()["dead_letters"] == 0

    runs = read_back(lab, spaces["b"], uri, "multinode", ("i", "loss"), env)
    assert sorted(runs) == ["node-a", "node-b"]
    for name in ("a", "b"):
        (run,) = runs[f"node-{name}"]  # one MLflow run per trackd run
        for key in ("i", "loss"):
            steps = sorted(step for step, _ in run["history"][key])
            assert steps == list(range(ROWS)), f"node {name}: {key} not every step exactly once"
        assert all(value == step for step, value in run["history"]["i"])
        assert run["status"] == "FINISHED"
        assert results[name]["worst_log_seconds"] < 0.5, "log() never waits on the network"
    figures = {
        "rows_per_node": ROWS,
        "cut_seconds": CUT_SECONDS,
        "a_retries_during_cut": during_a["retries"],
        "a_lag_records_at_reconnect": during_a["lag_records"],
        "b_rows_delivered_during_cut": during_b["delivered_rows"] - b_before,
        "worst_log_seconds": {name: r["worst_log_seconds"] for name, r in results.items()},
    }
    with capsys.disabled():
        print(f"\n[multinode] {json.dumps(figures)}", flush=True)
    for node in nodes.values():
        assert node.daemon is not None
        assert lab.end(node.daemon, signal.SIGTERM) == 0
