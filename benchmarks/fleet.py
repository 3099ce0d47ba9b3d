"""A fleet of node daemons overloading one MLflow server, adaptive against fixed concurrency.

    .venv/bin/python benchmarks/fleet.py                          # 8 nodes x 2 clients, 60 s
    .venv/bin/python benchmarks/fleet.py --nodes 4 --seconds 30 --outage 8 --cut 12

Run as root (it makes network namespaces, as tests/test_fleet.py does, through
tests/helpers/netns.py). One backend namespace holds PostgreSQL (tests/helpers/postgres.py,
started inside that namespace on its loopback) and an `mlflow server` with 2 workers on
it, bound to the bridge; N node namespaces each run `trackd serve --sink mlflow:URI` and
C training clients (tests/helpers/log_client.py, 3 metrics a row).

1. The server's ceiling: from a node namespace, across the bridge, concurrent raw
   `log_batch` REST calls of 1,000 metrics for `--probe` seconds, 16 at once: points/s.
2. For each mode (`concurrency=adaptive`, then `fixed`, both with `in_flight` 4; a fresh
   database each): the clients log together at `--overload` x the ceiling for
   `--seconds`; at 25% of that the server is SIGKILLed for `--outage` s, and at 40%
   node 0's link is cut for `--cut` s. Every second each daemon's status is sampled:
   rows delivered, records behind, retries, its concurrency limit. After the clients
   finish, every daemon flushes; each run is read back from MLflow and must hold every
   step of key `i` exactly once.

The sinks get `http_timeout` 30 s (`--http-timeout`): after a failed call the sink reads
each key's history back to skip what is already stored, and on a loaded 2-core machine
those reads of long runs took over the default 5 s, timed out, and were retried without end
(a smoke run, 2 nodes, never caught up; issue 13 §2 makes those reads cheap).

Figures per mode: the server's throughput (points/s stored by the fleet) while it was up
and the fleet had a backlog, as % of the ceiling; retries; each node's most records
behind; the worst `log()` call. JSON to benchmarks/results/fleet.json, a PNG of each
node's lag over time (and the fleet's delivery rate) to benchmarks/fleet.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))

from helpers.netns import (  # noqa: E402  (the tests' helpers, found through sys.path)
    Lab,
    NamespacedMlflow,
    Node,
    build_network,
    in_namespace,
    made_lab,
    read_back,
    set_link,
)

KEYS_PER_ROW = 3  # log_client.py logs loss, acc, i
SMOOTH = 10  # samples (seconds) per point of the plotted delivery rate

POSTGRES_IN_NAMESPACE = r"""
import sys
sys.path.insert(0, sys.argv[1])
from helpers.postgres import Postgres
server = Postgres({"max_connections": "200"}).start()
print(" ".join(server.create_database(name) for name in sys.argv[2:]), flush=True)
sys.stdin.read()  # until the benchmark closes it
server.stop()
"""

CEILING = r"""
import json, sys, threading, time, urllib.request
uri, seconds, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])

def post(path, body):
    call = urllib.request.Request(uri + "/api/2.0/mlflow/" + path, json.dumps(body).encode(),
                                  {"Content-Type": "application/json"})
    with urllib.request.urlopen(call, timeout=60) as answer:
        return json.loads(answer.read() or b"{}")

experiment = post("experiments/create", {"name": "ceiling"})["experiment_id"]
run = post("runs/create", {"experiment_id": experiment})["run"]["info"]["run_id"]
stored, lock, end = [0], threading.Lock(), time.monotonic() + seconds

def sender(index):
    step = index * 10_000_000
    while time.monotonic() < end:
        metrics = [{"key": f"k{i % 10}", "value": 1.0, "timestamp": 0, "step": step + i}
                   for i in range(1000)]
        step += 1000
        post("runs/log-batch", {"run_id": run, "metrics": metrics})
        with lock:
            stored[0] += 1000

began = time.monotonic()
workers = [threading.Thread(target=sender, args=(i,)) for i in range(threads)]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
print(json.dumps({"points_per_second": stored[0] / (time.monotonic() - began)}))
"""


def measure_ceiling(
    lab: Lab, spaces: dict[str, str], server: NamespacedMlflow, probe: float
) -> float:
    text = in_namespace(lab, spaces["n0"], CEILING, server.uri, str(probe), "16", env=server.env)
    rate: float = json.loads(text.strip().splitlines()[-1])["points_per_second"]
    return rate


class Sampler(threading.Thread):
    """Each node's sink status once a second: t, delivered rows, lag, retries, limit."""

    def __init__(self, nodes: dict[str, Node], began: float) -> None:
        super().__init__(daemon=True)
        self.nodes, self.began = nodes, began
        self.samples: dict[str, list[dict[str, Any]]] = {name: [] for name in nodes}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            for name, node in self.nodes.items():
                try:
                    sink = node.sink()
                except Exception as exc:  # a busy daemon's late answer costs one sample
                    print(f"sample {name}: {exc}", file=sys.stderr)
                    continue
                limit = (sink.get("concurrency") or {}).get("limit")
                self.samples[name].append(
                    {
                        "t": round(time.monotonic() - self.began, 2),
                        "delivered": sink["delivered_rows"],
                        "lag": sink["lag_records"],
                        "retries": sink["retries"],
                        "limit": limit,
                    }
                )


def run_mode(
    mode: str,
    lab: Lab,
    spaces: dict[str, str],
    server: NamespacedMlflow,
    args: argparse.Namespace,
    ceiling: float,
) -> dict[str, Any]:
    names = [f"n{i}" for i in range(args.nodes)]
    nodes = {name: Node(lab, f"{mode}-{name}", spaces[name], server.env) for name in names}
    for node in nodes.values():
        options = f"concurrency={mode}&in_flight={args.in_flight}&http_timeout={args.http_timeout}"
        node.serve("--sink", f"mlflow:{server.uri}?{options}")
    rows_per_second = args.overload * ceiling / KEYS_PER_ROW / (args.nodes * args.clients)
    rows = int(rows_per_second * args.seconds)
    pace = 100 / rows_per_second  # seconds per 100 rows, the time log() takes aside
    began = time.monotonic()
    sampler = Sampler(nodes, began)
    sampler.start()
    for name, node in nodes.items():
        for i in range(args.clients):
            node.log_run(f"fleet-{mode}", f"{name}-{i}", rows, pace)
    down_at, cut_at = args.seconds * 0.25, args.seconds * 0.4
    events: list[tuple[float, str]] = []
    time.sleep(down_at)
    server.kill()
    events.append((time.monotonic() - began, "server killed"))
    time.sleep(max(0.0, args.outage - (time.monotonic() - began - down_at)))
    server.start(probe_from=names[-1])
    events.append((time.monotonic() - began, "server answers"))
    time.sleep(max(0.0, cut_at - (time.monotonic() - began)))
    set_link(lab, spaces, names[0], up=False)
    events.append((time.monotonic() - began, f"{names[0]} link cut"))
    time.sleep(args.cut)
    set_link(lab, spaces, names[0], up=True)
    events.append((time.monotonic() - began, f"{names[0]} link back"))
    results: dict[str, Any] = {}
    for node in nodes.values():
        results.update(node.client_results(timeout=args.seconds * 10))
    logged_at = time.monotonic() - began
    caught_up = all(
        node.request("flush", timeout=args.drain + 5, wait=args.drain) for node in nodes.values()
    )
    caught_up_at = time.monotonic() - began
    sampler.stop.set()
    sampler.join()
    statuses = {name: node.sink() for name, node in nodes.items()}
    found = read_back(lab, spaces[names[-1]], server.uri, f"fleet-{mode}", ("i",), server.env)
    complete = (
        all(
            len(runs) == 1
            and sorted(step for step, _ in runs[0]["history"]["i"]) == list(range(rows))
            for runs in found.values()
        )
        and len(found) == args.nodes * args.clients
    )
    for node in nodes.values():
        assert node.daemon is not None
        lab.end(node.daemon)
    return {
        "mode": mode,
        "rows_per_client": rows,
        "offered_points_per_second": round(args.overload * ceiling),
        "events": [(round(t, 1), what) for t, what in events],
        "logged_seconds": round(logged_at, 1),
        "caught_up": caught_up,
        "caught_up_seconds": round(caught_up_at, 1),
        "every_point_once": complete,
        "retries": {name: status["retries"] for name, status in statuses.items()},
        "dead_letters": sum(status["dead_letters"] for status in statuses.values()),
        "most_behind": {
            name: max((s["lag"] for s in got), default=0) for name, got in sampler.samples.items()
        },
        "worst_log_seconds": max(result["worst_log_seconds"] for result in results.values()),
        "throughput": throughput(sampler.samples, events, ceiling),
        "samples": sampler.samples,
    }


def throughput(
    samples: dict[str, list[dict[str, Any]]], events: list[tuple[float, str]], ceiling: float
) -> dict[str, float]:
    """The fleet's stored points/s, per second, in the seconds the server was up, no link
    was cut, and some node had records waiting: its mean and median as % of the ceiling."""
    down = (events[0][0], events[1][0])
    cut = (events[2][0], events[3][0])
    per_second: list[float] = []
    lengths = [len(got) for got in samples.values()]
    for i in range(1, min(lengths, default=0)):
        now = [got[i] for got in samples.values()]
        before = [got[i - 1] for got in samples.values()]
        t = now[0]["t"]
        if down[0] <= t <= down[1] + 2 or cut[0] <= t <= cut[1] + 2:
            continue
        if not any(s["lag"] > 0 for s in now):
            continue
        span = max(now[0]["t"] - before[0]["t"], 1e-3)
        rows = sum(a["delivered"] - b["delivered"] for a, b in zip(now, before, strict=True))
        per_second.append(rows * KEYS_PER_ROW / span)
    if not per_second:
        return {"seconds": 0, "mean_points_per_second": 0, "mean_pct": 0.0}
    mean = sum(per_second) / len(per_second)  # a mean: a node's rows count once a batch is in
    return {
        "seconds": len(per_second),
        "mean_points_per_second": round(mean),
        "mean_pct": round(100 * mean / ceiling, 1),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = report["modes"]
    figure, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 7), squeeze=False)
    for column, result in enumerate(modes):
        lag, rate = axes[0][column], axes[1][column]
        for name, got in result["samples"].items():
            lag.plot([s["t"] for s in got], [s["lag"] for s in got], label=name)
        fleet = list(result["samples"].values())
        n = min(len(got) for got in fleet)
        # over the last SMOOTH samples: a node's rows count only once its whole batch is in
        times = [fleet[0][i]["t"] for i in range(SMOOTH, n)]
        stored = [
            sum(got[i]["delivered"] - got[i - SMOOTH]["delivered"] for got in fleet)
            * KEYS_PER_ROW
            / max(fleet[0][i]["t"] - fleet[0][i - SMOOTH]["t"], 1e-3)
            for i in range(SMOOTH, n)
        ]
        rate.plot(times, stored, color="black", label=f"fleet stored ({SMOOTH} s mean)")
        rate.axhline(report["ceiling_points_per_second"], linestyle="--", label="ceiling")
        for t, what in result["events"]:
            for axis in (lag, rate):
                axis.axvline(t, color="grey", linewidth=0.8)
            lag.annotate(what, (t, 0), rotation=90, fontsize=7, va="bottom")
        lag.set_title(f"concurrency={result['mode']}: records behind, per node")
        lag.set_ylabel("records behind")
        rate.set_title(f"fleet stored points/s ({result['throughput']['mean_pct']}% of ceiling)")
        rate.set_xlabel("seconds")
        rate.set_ylabel("points/s")
        lag.legend(fontsize=7, ncol=2)
        rate.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def stop(signum: int, frame: object) -> None:
    raise SystemExit(f"ended by signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--overload", type=float, default=3.0)
    parser.add_argument("--outage", type=float, default=15.0)
    parser.add_argument("--cut", type=float, default=30.0)
    parser.add_argument("--probe", type=float, default=15.0)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--drain", type=float, default=300.0, help="most seconds to catch up")
    parser.add_argument("--http-timeout", type=int, default=30, help="the sinks' http_timeout")
    parser.add_argument("--modes", default="adaptive,fixed")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fleet.json")
    parser.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "fleet.png")
    args = parser.parse_args()
    modes = args.modes.split(",")
    signal.signal(signal.SIGTERM, stop)  # `timeout` ends it: the lab is still taken down
    env = {**os.environ, "PYTHONPATH": str(TESTS / "helpers")}
    with (
        tempfile.TemporaryDirectory(prefix="trackd-fleet-") as temporary,
        made_lab(Path(temporary)) as lab,
    ):
        spaces = build_network(lab, [f"n{i}" for i in range(args.nodes)])
        postgres = subprocess.Popen(
            ["ip", "netns", "exec", spaces["backend"], sys.executable, "-c",
             POSTGRES_IN_NAMESPACE, str(TESTS), "ceiling", *modes],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        try:
            assert postgres.stdout is not None
            uris = dict(zip(["ceiling", *modes], postgres.stdout.readline().split(), strict=True))
            report: dict[str, Any] = {
                "nodes": args.nodes,
                "clients_per_node": args.clients,
                "seconds": args.seconds,
                "overload": args.overload,
                "outage_seconds": args.outage,
                "cut_seconds": args.cut,
                "in_flight": args.in_flight,
                "cpus": os.cpu_count(),
                "load_before": os.getloadavg()[0],
                "modes": [],
            }
            server = NamespacedMlflow(lab, spaces, env, uris["ceiling"], workers=2)
            server.start(probe_from="n0")
            report["ceiling_points_per_second"] = ceiling = measure_ceiling(
                lab, spaces, server, args.probe
            )
            print(f"ceiling: {ceiling:.0f} points/s", flush=True)
            server.kill()
            for mode in modes:
                server = NamespacedMlflow(lab, spaces, env, uris[mode], workers=2)
                server.start(probe_from="n0")
                result = run_mode(mode, lab, spaces, server, args, ceiling)
                server.kill()
                summary = {k: v for k, v in result.items() if k != "samples"}
                print(json.dumps(summary), flush=True)
                report["modes"].append(result)
        finally:
            assert postgres.stdin is not None
            postgres.stdin.close()
            postgres.wait(60)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    plot(report, args.png)
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
