"""How long the client's delivery thread packs a wake-up, in `training_loop.py`'s loop.

    python benchmarks/delivery_passes.py
    python benchmarks/delivery_passes.py --steps 4000 --mode online  # a daemon must be up

The thread packs the rows queued since its last wake-up while holding the GIL, and a
training thread whose torch op returns meanwhile waits for it: part of what trackd costs
a loop outside its calls (issue 13 §1). This times each `Transport._pack_queue` (wall and
the thread's CPU) while the MLP of `training_loop.py` trains and logs as that script does:
20 scalars a step, a histogram every 50th, a 64x64 image every 200th (whose PNG the thread
writes, letting go of the GIL, and stores with an fsync). Offline by default: the packing
is the same, and no daemon is needed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from training_loop import HISTOGRAM_EVERY, IMAGE_EVERY, mlp, scalars_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--mode", choices=("offline", "online"), default="offline")
    parser.add_argument("--no-media", dest="media", action="store_false", help="scalars only")
    args = parser.parse_args()
    os.environ.setdefault("TRACKD_DATA_DIR", tempfile.mkdtemp(prefix="trackd-passes-"))
    import numpy as np
    import torch

    import trackd
    from trackd.client import transport

    passes: list[tuple[float, float, int]] = []  # (wall s, thread CPU s, rows) of each pass
    pack_queue = transport.Transport._pack_queue

    def timed(self: transport.Transport, limit: float = float("inf")) -> tuple[int, int]:
        wall, cpu = time.perf_counter(), time.thread_time()
        framed = pack_queue(self, limit)
        passes.append((time.perf_counter() - wall, time.thread_time() - cpu, framed[0]))
        return framed

    transport.Transport._pack_queue = timed  # type: ignore[method-assign]
    model, step_of = mlp()
    x, y = torch.randn(128, 512), torch.randint(0, 10, (128,))
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    run = trackd.init(project="delivery-passes", name="mlp", mode=args.mode)
    started = time.perf_counter()
    for step in range(args.steps):
        loss = step_of(x, y)
        row = scalars_of(loss)
        if args.media and step % HISTOGRAM_EVERY == 0:
            weights = model[4].weight.detach().numpy()
            row["weights"] = trackd.Histogram(np_histogram=np.histogram(weights, 64))
        if args.media and step % IMAGE_EVERY == 0:
            row["sample"] = trackd.Image(image)
        run.log(row, step=step)
    loop = time.perf_counter() - started
    during = [entry for entry in passes if entry[2]]  # the loop's passes: rows framed
    run.finish()
    walls, cpus, rows = (sorted(column) for column in zip(*during, strict=True))
    print(f"loop {loop:.1f} s; {len(walls)} passes with rows ({len(walls) / loop:.1f}/s)")
    print(f"rows a pass: median {statistics.median(rows):.0f}")
    print(
        f"a pass, µs: wall median {statistics.median(walls) * 1e6:.0f}, max {walls[-1] * 1e6:.0f}"
    )
    print(f"a pass, µs: thread CPU median {statistics.median(cpus) * 1e6:.0f}")
    print(
        f"packing, of the loop's time: {sum(walls) / loop * 100:.3f}% wall, "
        f"{sum(cpus) / loop * 100:.3f}% CPU; {sum(cpus) / sum(rows) * 1e6:.1f} µs CPU a row"
    )


if __name__ == "__main__":
    main()
