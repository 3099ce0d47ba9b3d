"""How much slower a real training loop gets when it logs with trackd (issue 13 §1).

    python benchmarks/training_loop.py                                  # the working tree
    python benchmarks/training_loop.py --trees before=/tmp/old/src,after=src --repeats 5

A CPU PyTorch MLP (512-768-768-10, synthetic data; the batch is the one whose
step comes closest to `--step-ms` in the first run, then kept for all) trains
for `--steps` logged steps and as many unlogged ones, in blocks of `--block`
steps alternating inside one process: fresh processes on a shared VM differ by
several % in step time, more than the effect measured, so logged and unlogged steps are only
compared within a process. A logged step logs 20 scalars, every 50th a
histogram of the last layer's weights, every 200th a 64x64 image; the run
ends with `finish()` (`--no-media`: the scalars alone). The histogram is of
the last layer's weights, binned by `numpy.histogram` as W&B's own Histogram
does (trackd.Histogram bins a plain sequence in Python, ~2 µs a value). The
slowdown is the logged blocks' wall time over the
unlogged blocks' minus one; CPU is the process's (all threads) in the same
blocks. "to backend" is from the last step until every row is in the
daemon's JSONL sink (finish, the process's exit, the sink's flush).

Each repeat runs every tree in a fresh process, each with its own daemon (of
this checkout) in a temporary directory; `--trees NAME=SRC` puts SRC first on
the worker's PYTHONPATH, to measure an older commit checked out elsewhere.
torch runs on one thread: on a 2-core machine shared with others, its
intra-op threads would measure the machine's load rather than the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from log_latency import Daemon, _rows_delivered
from machine import provenance

HERE = Path(__file__).resolve()
SCALARS = 20
HISTOGRAM_EVERY = 50
IMAGE_EVERY = 200
BATCHES = (4, 8, 16, 32, 64, 128)


def worker(steps: int, block: int, step_ms: float, batch: int, media: bool, out: Path) -> None:
    import numpy as np
    import torch

    import trackd

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 768),
        torch.nn.ReLU(),
        torch.nn.Linear(768, 768),
        torch.nn.ReLU(),
        torch.nn.Linear(768, 10),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def train_step(x: Any, y: Any) -> float:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return float(loss.item())

    def data(batch: int) -> tuple[Any, Any]:
        return torch.randn(batch, 512), torch.randint(0, 10, (batch,))

    def step_seconds(batch: int) -> float:
        x, y = data(batch)
        for _ in range(5):
            train_step(x, y)
        started = time.perf_counter()
        for _ in range(20):
            train_step(x, y)
        return (time.perf_counter() - started) / 20

    if not batch:
        batch = min(BATCHES, key=lambda size: abs(step_seconds(size) * 1e3 - step_ms))
    x, y = data(batch)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    run = trackd.init(project="training-loop", name="mlp")
    run.flush(timeout=60)
    delivery = _thread_stats("trackd-")
    logged = {"wall": 0.0, "cpu": 0.0}
    unlogged = {"wall": 0.0, "cpu": 0.0}
    pair_ratios = []
    load_before = os.getloadavg()[0]
    step = 0
    last_step_at = 0.0
    loop_started = time.perf_counter()
    while step < steps:
        walls = {}
        for log in (True, False) if (step // block) % 2 == 0 else (False, True):
            totals = logged if log else unlogged
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(step, step + block):
                loss = train_step(x, y)
                if log:
                    values: dict[str, Any] = {"loss": loss, "lr": 0.01}
                    values.update({f"train/m{k}": loss * k for k in range(SCALARS - 2)})
                    if media and i % HISTOGRAM_EVERY == 0:
                        weights = model[4].weight.detach().numpy()
                        values["weights"] = trackd.Histogram(np_histogram=np.histogram(weights, 64))
                    if media and i % IMAGE_EVERY == 0:
                        values["sample"] = trackd.Image(image)
                    run.log(values, step=i)
            walls[log] = time.perf_counter() - wall
            totals["wall"] += walls[log]
            totals["cpu"] += time.process_time() - cpu
        last_step_at = time.time()
        pair_ratios.append(walls[True] / walls[False])
        step += block
    delivery_after = _thread_stats("trackd-")
    loop_seconds = time.perf_counter() - loop_started
    finish_started = time.perf_counter()
    run.finish(timeout=120)
    result = {
        "trackd_file": trackd.__file__,
        "batch": batch,
        "steps_each": step,
        "step_ms_unlogged": unlogged["wall"] / step * 1e3,
        "slowdown_pct": (logged["wall"] / unlogged["wall"] - 1) * 100,
        "median_pair_slowdown_pct": (statistics.median(pair_ratios) - 1) * 100,
        "cpu_overhead_pct": (logged["cpu"] / unlogged["cpu"] - 1) * 100,
        "cpu_per_wall_logged": logged["cpu"] / logged["wall"],
        "finish_s": time.perf_counter() - finish_started,
        "last_step_at": last_step_at,
        "delivery_wakeups_per_s": (delivery_after[0] - delivery[0]) / loop_seconds,
        "delivery_cpu_pct": (delivery_after[1] - delivery[1]) / loop_seconds * 100,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    out.write_text(json.dumps(result))


def _thread_stats(prefix: str) -> tuple[int, float]:
    """Voluntary context switches (a wake-up each) and CPU seconds of this process's thread
    named `prefix`..., from /proc (Linux): how often trackd's delivery thread woke up."""
    import threading

    (thread,) = (t for t in threading.enumerate() if t.name.startswith(prefix))
    task = Path(f"/proc/self/task/{thread.native_id}")
    status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return int(status["voluntary_ctxt_switches"]), cpu


def run_tree(name: str, src: str, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"trackd-train-{name}-"))
    daemon = Daemon(sys.executable, work, [])
    try:
        out = work / "result.json"
        env = {**os.environ, **daemon.env(), "PYTHONPATH": str(Path(src).resolve())}
        env.pop("TRACKD_ENDPOINT", None)
        command = [sys.executable, str(HERE), "--worker", "--out", str(out)]
        command += ["--steps", str(args.steps), "--block", str(args.block)]
        command += ["--step-ms", str(args.step_ms), "--batch", str(args.batch)]
        command += [] if args.media else ["--no-media"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return {"tree": name, "error": done.stderr.strip().splitlines()[-3:]}
        result: dict[str, Any] = json.loads(out.read_text())
        rows = _rows_delivered(daemon, sys.executable)
        result["to_backend_s"] = time.time() - result.pop("last_step_at")
        result["rows_in_sink"] = rows
        result["tree"] = name
        return result
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


def summary(results: list[dict[str, Any]], trees: list[str]) -> str:
    """Per tree, the median over runs (and its range) of each run's median block-pair slowdown:
    a block hit by another process's burst moves a run's total but not its median."""
    header = (
        f"{'tree':<10} {'slowdown % median [min..max]':>30} {'total %':>8} {'CPU +%':>7} "
        f"{'step ms':>8} {'to backend s':>13} {'rows':>6} {'wake/s':>7} {'thread CPU %':>12} "
        f"{'load':>10}"
    )
    lines = [header]
    for tree in trees:
        ok = [r for r in results if r["tree"] == tree and "error" not in r]
        for failed in (r for r in results if r["tree"] == tree and "error" in r):
            lines.append(f"{tree:<10} failed: {failed['error']}")
        if not ok:
            continue
        slow = [r["median_pair_slowdown_pct"] for r in ok]

        def med(key: str, rows: list[dict[str, Any]] = ok) -> float:
            return statistics.median(r[key] for r in rows)

        loads = [r["load_before"] for r in ok]
        lines.append(
            f"{tree:<10} {statistics.median(slow):>12.2f} [{min(slow):6.2f}..{max(slow):6.2f}]"
            f"{'':>3} {med('slowdown_pct'):>8.2f} {med('cpu_overhead_pct'):>7.2f} "
            f"{med('step_ms_unlogged'):>8.2f} {med('to_backend_s'):>13.2f} "
            f"{min(r['rows_in_sink'] for r in ok):>6} {med('delivery_wakeups_per_s'):>7.1f} "
            f"{med('delivery_cpu_pct'):>12.2f} {min(loads):4.1f}-{max(loads):4.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", default="working=src", help="NAME=SRC,...; SRC holds trackd")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2000, help="logged steps (as many unlogged)")
    parser.add_argument("--block", type=int, default=25, help="steps per alternating block")
    parser.add_argument("--step-ms", type=float, default=5.0, help="aim for a step this long")
    parser.add_argument(
        "--batch", type=int, default=0, help="default: the first run's, by --step-ms"
    )
    parser.add_argument(
        "--no-media",
        dest="media",
        action="store_false",
        help="scalars only: no histogram, image",
    )
    parser.add_argument("--save", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.block, args.step_ms, args.batch, args.media, args.out)
        return
    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    machine = {"cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    machine.update(provenance(sys.executable))
    results = []
    for repeat in range(args.repeats):
        order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
        for name in order:
            result = run_tree(name, trees[name], args)
            print(json.dumps({"repeat": repeat, **result}), flush=True)
            args.batch = args.batch or result.get("batch", 0)  # one batch size for every run
            results.append(result)
    print(summary(results, list(trees)))
    if args.save:
        args.save.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
