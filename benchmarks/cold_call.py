"""What one `run.log()` of 20 scalars costs right after a torch step, piece by piece (issue 13 §1).

    python benchmarks/cold_call.py
    python benchmarks/cold_call.py --repeats 3 --calls 300

A call made after a training step meets caches and TLBs that the step's kernels
emptied: on this VM a no-op call costs ~0.7 µs there, a `threading.Lock` taken
and let go ~2.5 µs more, where a tight loop of calls measures ~0.1 µs for
either. So the cost of `log()` in a training loop is not what `log_latency.py`
reads in a tight loop, and each piece is timed here the way the loop meets it:
one call after each step of the 512-768-768-10 MLP of `training_loop.py` (batch
128, torch on one thread), the median over `--calls` steps. The run is offline
(a spool, no daemon): the caller's side only. The pieces are the steps of
`Run.log` written out, beside the three ways of queuing a row that issue 13 §1
compared: merging the step and time into the row under int keys, under the
run's lock (until 2026-12-03); a copy of the row with its `(step, time)` in a
list beside it, under the lock (the eighth session); and both in one
`list.extend`, with no lock (since the ninth). The last pieces are the media of
`training_loop.py`: a histogram every 50 steps, an image every 200.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from training_loop import mlp, scalars_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--calls", type=int, default=300, help="steps (and calls) per figure")
    args = parser.parse_args()
    os.environ.setdefault("TRACKD_DATA_DIR", tempfile.mkdtemp(prefix="trackd-cold-call-"))
    import numpy as np
    import torch

    import trackd
    from trackd.client.values import metric_row

    model, step_of = mlp()
    x, y = torch.randn(128, 512), torch.randint(0, 10, (128,))
    # training_loop.py's media: numpy.histogram of the last layer's weights, a 64x64 image
    histogram = np.histogram(model[4].weight.detach().numpy(), 64)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)

    def train_step() -> float:
        return step_of(x, y)

    run = trackd.init(project="cold-call", name="pieces", mode="offline")
    lock = threading.Lock()
    rows: list[Any] = []
    stamps: list[tuple[int, float]] = []

    def locked(row: dict[str, float], step: int) -> None:
        with lock:
            pass

    def int_keys(row: dict[str, float], step: int) -> None:
        values = metric_row(row)
        with lock:
            rows.append({**values, 0: step, 1: time.time()})

    def stamped(row: dict[str, float], step: int) -> None:
        values = metric_row(row)
        with lock:
            stamps.append((step, time.time()))
            rows.append(values.copy())

    def extended(row: dict[str, float], step: int) -> None:
        values = metric_row(row)
        rows.extend(((step, time.time()), values.copy()))

    pieces: dict[str, Callable[[dict[str, float], int], object]] = {
        "a no-op call": lambda row, step: None,
        "a dict copy of the row": lambda row, step: row.copy(),
        "time.time()": lambda row, step: time.time(),
        "a threading.Lock, taken and let go": locked,
        "metric_row() (the check of keys and values)": lambda row, step: metric_row(row),
        "check + lock + row merged under int keys": int_keys,
        "check + lock + row copied, (step, time) beside": stamped,
        "check + (step, time) and row copy in one extend": extended,
        "run.log(row, step=step)": lambda row, step: run.log(row, step=step),
        "Histogram(np_histogram=...), 64 bins": lambda row, step: trackd.Histogram(
            np_histogram=histogram
        ),
        "Image() of a 64x64x3 uint8 array": lambda row, step: trackd.Image(image),
        "run.log(row and a Histogram, step=step)": lambda row, step: run.log(
            {**row, "weights": trackd.Histogram(np_histogram=histogram)}, step=step
        ),
    }
    medians: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(args.repeats):
        for name, piece in pieces.items():
            taken = []
            for step in range(args.calls):
                loss = train_step()
                row = scalars_of(loss)
                started = time.perf_counter()
                piece(row, step)
                taken.append(time.perf_counter() - started)
            medians[name].append(statistics.median(taken) * 1e6)
            rows.clear()
            stamps.clear()
    run.finish()
    print(f"{'piece (one call after each torch step)':50} median µs, one figure per repeat")
    for name, figures in medians.items():
        print(f"{name:50} " + " / ".join(f"{figure:.1f}" for figure in figures))


if __name__ == "__main__":
    main()
