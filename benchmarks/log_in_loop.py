"""The time inside `run.log()` at a training loop's pace, by kind of step (issue 13 §1).

    python benchmarks/log_in_loop.py
    python benchmarks/log_in_loop.py --trees before=/tmp/old/src,after=src --repeats 3

`training_loop.py` reads the loop's slowdown, whose noise on a shared 2-core VM
(±1-2% between runs of the control) is larger than trackd's effect. This reads
what trackd adds directly: the wall time inside `run.log()` (and `trackd.Image()`,
which encodes the PNG in the caller). Each step logs what a `training_loop.py`
step logs (20 scalars; every 50th a histogram of a 10x768 weight matrix, every
200th a 64x64 image), then sleeps `--step-ms` in place of the torch step: a call
made after a sleep meets cold caches, as one after a torch step does, and costs
several times what a tight loop of calls measures. The run is offline (a spool,
no daemon): what is timed is the caller's side only. Each tree runs in a fresh
process, interleaved over `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from training_loop import HISTOGRAM_EVERY, IMAGE_EVERY, scalars_of

HERE = Path(__file__).resolve()


def worker(steps: int, step_ms: float) -> dict[str, Any]:
    import numpy as np

    import trackd

    run = trackd.init(project="log-in-loop", name="cost", mode="offline")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    weights = rng.standard_normal((10, 768)).astype(np.float32)
    times: dict[str, list[float]] = {"scalars": [], "histogram": [], "image": [], "Image()": []}
    for step in range(steps):
        loss = 1.0 / (step + 1)
        values = scalars_of(loss)
        kind = "scalars"
        if step % HISTOGRAM_EVERY == 0:
            values["weights"] = trackd.Histogram(np_histogram=np.histogram(weights, 64))
            kind = "histogram"
        if step % IMAGE_EVERY == 0:
            started = time.perf_counter()
            values["sample"] = trackd.Image(image)
            times["Image()"].append(time.perf_counter() - started)
            kind = "image"
        started = time.perf_counter()
        run.log(values, step=step)
        times[kind].append(time.perf_counter() - started)
        time.sleep(step_ms / 1000)
    run.finish()
    return {
        kind: {
            "calls": len(taken),
            "median_us": statistics.median(taken) * 1e6,
            "max_us": max(taken) * 1e6,
            "total_ms": sum(taken) * 1e3,
        }
        for kind, taken in times.items()
    }


def measure(tree: str | None, steps: int, step_ms: float) -> dict[str, Any]:
    env = {**os.environ, "TRACKD_DATA_DIR": tempfile.mkdtemp(prefix="trackd-log-in-loop-")}
    if tree:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
    command = [sys.executable, str(HERE), "--worker", "--steps", str(steps)]
    out = subprocess.run(
        [*command, "--step-ms", str(step_ms)], env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default="", help="NAME=SRC,...: SRC first on PYTHONPATH")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--step-ms", type=float, default=4.0, help="the sleep standing for a step")
    parser.add_argument("--save", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps, args.step_ms)))
        return
    trees = dict(item.split("=", 1) for item in args.trees.split(",") if item) or {"this": ""}
    results = []
    for repeat in range(args.repeats):
        for name, tree in trees.items():
            results.append(
                {"tree": name, "repeat": repeat, **measure(tree, args.steps, args.step_ms)}
            )
    kinds = ("scalars", "histogram", "image", "Image()")
    print(
        f"{'tree':10} "
        + "  ".join(f"{kind + ' median µs':>22}" for kind in kinds)
        + "   in calls ms"
    )
    for name in trees:
        mine = [result for result in results if result["tree"] == name]
        medians = [
            "/".join(f"{result[kind]['median_us']:.0f}" for result in mine) for kind in kinds
        ]
        totals = "/".join(
            f"{sum(result[kind]['total_ms'] for kind in kinds):.0f}" for result in mine
        )
        print(f"{name:10} " + "  ".join(f"{median:>22}" for median in medians) + f"   {totals}")
    print(f"({args.steps} steps, a {args.step_ms} ms sleep each; one figure per repeat)")
    if args.save:
        args.save.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
