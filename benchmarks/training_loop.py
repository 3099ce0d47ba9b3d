"""How much slower a real training loop gets when it logs: trackd beside its peers (issue 13 §1).

    python benchmarks/training_loop.py                                  # every case, 5 repeats
    python benchmarks/training_loop.py --cases none,trackd,wandb --repeats 3 --save out.json
    python benchmarks/training_loop.py --cases trackd --trees before=/tmp/old/src,after=src
    python benchmarks/training_loop.py --chart results/training_loop-peers.json  # the PNG

A CPU PyTorch MLP (512-768-768-10, synthetic data; the batch is the one whose
step comes closest to `--step-ms` in the first run, then kept for all) trains
for `--steps` logged steps and as many unlogged ones, in blocks of `--block`
steps alternating inside one process: fresh processes on a shared VM differ by
several % in step time, more than the effect measured, so logged and unlogged
steps are only compared within a process. A logged step logs 20 scalars, every
50th a histogram of the last layer's weights, every 200th a 64x64 image; the
run ends with `finish()` (`--no-media`: the scalars alone). Both blocks build
those values (the dict, the histogram's bins): that is the script's work, the
same whatever the library, and only the logged block hands them over. Until
2026-12-02 only the logged block built them, and every case's reading, `none`'s
included, held that work (`none` read 0.5-1.6%). Each library gets
the calls its users would write (`CASES`): the histogram is binned by
`numpy.histogram` in the loop (tensorboardX's `add_histogram` bins the weights
itself; MLflow has no histogram, so it logs none). The slowdown is the logged
blocks' wall time over the unlogged blocks' minus one; CPU is the process's
(all threads; not other processes such as wandb-core, the trackd daemon or the
mlflow server) in the same blocks. The training thread's own figures split the
slowdown: "thread +%" is its extra CPU in the logged blocks (the calls, and the
torch work slowed by what they left in the caches), "waits %" its extra time off
a CPU (waiting for the GIL a background thread holds, or preempted), both of
the unlogged blocks' wall time. "helpers %" is the CPU of the processes working
for the library during the loop (the trackd daemon, wandb-core), in % of one
core. The case `none` logs nothing in either block: its "slowdown" is what the
method reads when there is nothing to read.

"to backend" is from the last step until the data is in the backend: for the
trackd cases until every row and media index is in the daemon's JSONL sink
(`metrics.jsonl`, polled every 10 ms after `finish()`); for the peers until
their own end of run returns (`finish()`, `flush_async_logging()` and
`end_run()`, `close()`), which returns once their data is stored.

Each repeat runs every case in a fresh process, in an order that alternates
between repeats; a trackd case gets a daemon of its own (of this checkout) in
a temporary directory, mlflow a local `mlflow server` (sqlite, 127.0.0.1)
started once. Everything stays local: wandb offline (its default console
capture and system stats on, as a user has them), trackio and aim in
temporary directories. `--trees NAME=SRC` puts SRC first on the trackd cases'
PYTHONPATH, to measure an older commit checked out elsewhere. torch runs on
one thread: on a 2-core machine shared with others, its intra-op threads would
measure the machine's load rather than the loop.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dropin import start_mlflow_server, stop_service
from log_latency import Daemon, _peer_env
from machine import provenance

HERE = Path(__file__).resolve()
SCALARS = 20
HISTOGRAM_EVERY = 50
IMAGE_EVERY = 200
BATCHES = (4, 8, 16, 32, 64, 128)


def scalars_of(loss: float) -> dict[str, Any]:
    """A logged step's `SCALARS` values, as the loop builds them afresh each step."""
    scalars: dict[str, Any] = {"loss": loss, "lr": 0.01}
    scalars.update({f"train/m{k}": loss * k for k in range(SCALARS - 2)})
    return scalars


# case -> what it measures; the trackd cases log through a daemon of their own
CASES: dict[str, str] = {
    "none": "no logging (the method's noise)",
    "trackd": "trackd run.log",
    "trackd.wandb": "import trackd.wandb as wandb",
    "wandb": "wandb offline",
    "mlflow": "mlflow async, local server",
    "trackio": "trackio (local)",
    "tensorboardX": "tensorboardX",
    "aim": "aim (local repo)",
}
TRACKD_CASES = ("trackd", "trackd.wandb")


@dataclass
class Logger:
    """One library's calls for a logged step and for the end of the run.

    `log(step, scalars, histogram, image)`: histogram is `(counts, edges)` and
    image a uint8 HxWx3 array, or None; `landed()` (trackd only) says whether
    everything is in the backend once `finish()` returned."""

    log: Callable[[int, dict[str, float], Any, Any], None]
    finish: Callable[[], None]
    landed: Callable[[], bool] | None = None


def _none(name: str, work: Path) -> Logger:
    return Logger(lambda *_: None, lambda: None)


def _trackd(name: str, work: Path) -> Logger:
    import trackd

    run = trackd.init(project="training-loop", name=name)
    return _dict_logger(run.log, trackd.Histogram, trackd.Image, lambda: run.finish(timeout=120))


def _trackd_wandb(name: str, work: Path) -> Logger:
    import trackd.wandb as wandb  # noqa: PLR0402  # as the issue and users write it

    run = wandb.init(project="training-loop", name=name)
    return _dict_logger(run.log, wandb.Histogram, wandb.Image, run.finish)


def _wandb(name: str, work: Path) -> Logger:
    import wandb

    run = wandb.init(project="training-loop", name=name, mode="offline")
    return _dict_logger(run.log, wandb.Histogram, wandb.Image, run.finish, trackd_run=False)


def _trackio(name: str, work: Path) -> Logger:
    import trackio

    trackio.init(project="training-loop", name=name, embed=False)
    return _dict_logger(trackio.log, trackio.Histogram, trackio.Image, trackio.finish, False)


def _dict_logger(
    log: Callable[..., None],
    histogram_type: Callable[..., Any],
    image_type: Callable[..., Any],
    finish: Callable[[], None],
    trackd_run: bool = True,
) -> Logger:
    """The libraries that take one dict a step, media objects in it (W&B's API, and trackd's,
    trackio's after it); a trackd run also says when its rows are in the JSONL sink."""
    media = [0]

    def dict_log(step: int, scalars: dict[str, float], histogram: Any, image: Any) -> None:
        values: dict[str, Any] = scalars  # the loop's own, new each step: no copy charged here
        if histogram is not None:
            values["weights"] = histogram_type(np_histogram=histogram)
            media[0] += 1
        if image is not None:
            values["sample"] = image_type(image)
            media[0] += 1
        log(values, step=step)

    return Logger(dict_log, finish, _jsonl_landed(media) if trackd_run else None)


def _mlflow(name: str, work: Path) -> Logger:
    """MLflow has no histogram: it logs none."""
    import mlflow

    mlflow.config.enable_async_logging(True)
    mlflow.set_experiment("training-loop")
    mlflow.start_run(run_name=name)

    def mlflow_log(step: int, scalars: dict[str, float], histogram: Any, image: Any) -> None:
        mlflow.log_metrics(scalars, step=step)  # asynchronous: enable_async_logging
        if image is not None:
            mlflow.log_image(image, key="sample", step=step)

    def mlflow_finish() -> None:
        mlflow.flush_async_logging()
        mlflow.end_run()

    return Logger(mlflow_log, mlflow_finish)


def _tensorboardx(name: str, work: Path) -> Logger:
    """`add_histogram` bins the weights itself: it gets them instead of (counts, edges)."""
    import tensorboardX

    writer = tensorboardX.SummaryWriter(str(work / "tensorboard" / name))

    def tb_log(step: int, scalars: dict[str, float], weights: Any, image: Any) -> None:
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)
        if weights is not None:
            writer.add_histogram("weights", weights, step, bins=64)
        if image is not None:
            writer.add_image("sample", image, step, dataformats="HWC")

    return Logger(tb_log, writer.close)


def _aim(name: str, work: Path) -> Logger:
    import aim

    run = aim.Run(repo=str(work / "aim"), experiment="training-loop")
    run.name = name

    def aim_log(step: int, scalars: dict[str, float], histogram: Any, image: Any) -> None:
        run.track(scalars, step=step)
        if histogram is not None:
            counts, edges = histogram
            bin_range = (float(edges[0]), float(edges[-1]))
            run.track(aim.Distribution(hist=counts, bin_range=bin_range), "weights", step)
        if image is not None:
            run.track(aim.Image(image), name="sample", step=step)

    return Logger(aim_log, run.close)


LOGGERS: dict[str, Callable[[str, Path], Logger]] = {
    "none": _none,
    "trackd": _trackd,
    "trackd.wandb": _trackd_wandb,
    "wandb": _wandb,
    "mlflow": _mlflow,
    "trackio": _trackio,
    "tensorboardX": _tensorboardx,
    "aim": _aim,
}


def _jsonl_landed(media: list[int]) -> Callable[[], bool]:
    """Whether the daemon's JSONL sink (of this process's own daemon) holds every row and
    media index row: one line each, the logged steps plus the media counted in `media[0]`."""
    runs = Path(os.environ["TRACKD_DATA_DIR"]) / "runs"
    expected: list[int] = []

    def landed() -> bool:
        if not expected:
            expected.append(_logged_steps[0] + media[0])
        files = list(runs.glob("*/*/metrics.jsonl"))
        return bool(files) and sum(1 for _ in files[0].open("rb")) >= expected[0]

    return landed


_logged_steps = [0]  # set by the worker's loop before landed() is first asked


def mlp() -> tuple[Any, Callable[[Any, Any], float]]:
    """The 512-768-768-10 MLP on one torch thread, and its SGD step on a batch (x, y)."""
    import torch

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

    return model, train_step


def worker(
    case: str, steps: int, block: int, step_ms: float, batch: int, media: bool, out: Path
) -> None:
    import numpy as np
    import torch

    model, train_step = mlp()

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
    work = Path(os.environ["BENCH_WORK"])
    name = f"mlp-{case.replace('.', '-')}-{os.getpid()}"
    setup_started = time.perf_counter()
    logger = LOGGERS[case](name, work)
    setup_s = time.perf_counter() - setup_started
    delivery = _thread_stats("trackd-") if case in TRACKD_CASES else (0, 0.0)
    helpers = _helper_cpu()
    logged = {"wall": 0.0, "cpu": 0.0, "thread": 0.0}
    unlogged = {"wall": 0.0, "cpu": 0.0, "thread": 0.0}
    pair_ratios = []
    in_calls = 0.0  # wall time inside the library's logging calls
    load_before = os.getloadavg()[0]
    step = 0
    last_step_at = 0.0
    loop_started, loop_cpu = time.perf_counter(), time.process_time()
    while step < steps:
        walls = {}
        for log in (True, False) if (step // block) % 2 == 0 else (False, True):
            totals = logged if log else unlogged
            wall, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
            for i in range(step, step + block):
                loss = train_step(x, y)
                # The values a logged step hands over are built in both blocks: the script's
                # own work, the same for every library, is not the library's slowdown.
                scalars = scalars_of(loss)
                histogram = weights = image_now = None
                if media and i % HISTOGRAM_EVERY == 0:
                    weights = model[4].weight.detach().numpy()
                    histogram = np.histogram(weights, 64)
                if media and i % IMAGE_EVERY == 0:
                    image_now = image
                if log:
                    called = time.perf_counter()
                    logger.log(
                        i, scalars, weights if case == "tensorboardX" else histogram, image_now
                    )
                    in_calls += time.perf_counter() - called
            walls[log] = time.perf_counter() - wall
            totals["wall"] += walls[log]
            totals["cpu"] += time.process_time() - cpu
            totals["thread"] += time.thread_time() - thread
        last_step_at = time.perf_counter()
        pair_ratios.append(walls[True] / walls[False])
        step += block
    _logged_steps[0] = step
    delivery_after = _thread_stats("trackd-") if case in TRACKD_CASES else (0, 0.0)
    helpers_after = _helper_cpu()
    loop_seconds = last_step_at - loop_started
    finish_started = time.perf_counter()
    logger.finish()
    finish_s = time.perf_counter() - finish_started
    landed = logger.landed
    while landed is not None and not landed():
        if time.perf_counter() - finish_started > 300:
            raise SystemExit("the rows did not reach the JSONL sink within 300 s of finish()")
        time.sleep(0.01)
    to_backend_s = time.perf_counter() - last_step_at
    result = {
        "case": case,
        "batch": batch,
        "steps_each": step,
        "setup_s": setup_s,
        "step_ms_unlogged": unlogged["wall"] / step * 1e3,
        "slowdown_pct": (logged["wall"] / unlogged["wall"] - 1) * 100,
        "median_pair_slowdown_pct": (statistics.median(pair_ratios) - 1) * 100,
        "cpu_overhead_pct": (logged["cpu"] / unlogged["cpu"] - 1) * 100,
        "cpu_per_wall_logged": logged["cpu"] / logged["wall"],
        # The training thread's own CPU, and the time it spent off a CPU (waiting for the
        # GIL, or preempted), logged blocks against unlogged ones, of the unlogged wall.
        "thread_cpu_pct": (logged["thread"] - unlogged["thread"]) / unlogged["wall"] * 100,
        "thread_waits_pct": (
            (logged["wall"] - logged["thread"]) - (unlogged["wall"] - unlogged["thread"])
        )
        / unlogged["wall"]
        * 100,
        "in_calls_pct": in_calls / unlogged["wall"] * 100,  # the calls alone, of the loop
        "loop_s": loop_seconds,
        "loop_cpu_s": time.process_time() - loop_cpu,  # the loop and the end of the run
        "finish_s": finish_s,
        "to_backend_s": to_backend_s,
        "delivery_wakeups_per_s": (delivery_after[0] - delivery[0]) / loop_seconds,
        "delivery_cpu_pct": (delivery_after[1] - delivery[1]) / loop_seconds * 100,
        # Other processes working for the library meanwhile (the trackd daemon, wandb-core),
        # % of one core over the loop; not the mlflow server, which is the backend.
        "helper_cpu_pct": (helpers_after - helpers) / loop_seconds * 100,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    out.write_text(json.dumps(result))


def _helper_cpu() -> float:
    """CPU seconds so far of the processes working for the logging library: this process's
    children (wandb-core) and the trackd daemon (`BENCH_DAEMON_PID`, set by `run_case`)."""
    import psutil

    processes = psutil.Process().children(recursive=True)
    if os.environ.get("BENCH_DAEMON_PID"):
        processes.append(psutil.Process(int(os.environ["BENCH_DAEMON_PID"])))
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:  # a child that ended between the listing and now
            continue
        total += times.user + times.system
    return total


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


def run_case(label: str, case: str, src: str, args: argparse.Namespace) -> dict[str, Any]:
    """One case in a fresh process (with a fresh daemon for trackd); its result."""
    work = Path(tempfile.mkdtemp(prefix=f"trackd-train-{case}-"))
    daemon = Daemon(sys.executable, work, []) if case in TRACKD_CASES else None
    try:
        out = work / "result.json"
        env = {**os.environ, **_peer_env(work), "BENCH_WORK": str(work)}
        env.pop("WANDB__DISABLE_STATS")  # wandb as its users have it: system stats on
        env.pop("TRACKD_ENDPOINT", None)
        env["MLFLOW_TRACKING_URI"] = args.mlflow_uri or env["MLFLOW_TRACKING_URI"]
        if daemon is not None:
            env.update(daemon.env(), PYTHONPATH=str(Path(src).resolve()))
            env["BENCH_DAEMON_PID"] = str(daemon.process.pid)
        command = [sys.executable, str(HERE), "--worker", case, "--out", str(out)]
        command += ["--steps", str(args.steps), "--block", str(args.block)]
        command += ["--step-ms", str(args.step_ms), "--batch", str(args.batch)]
        command += [] if args.media else ["--no-media"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            return {"label": label, "error": done.stderr.strip().splitlines()[-3:]}
        result: dict[str, Any] = json.loads(out.read_text())
        result["label"] = label
        return result
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


def summarize(results: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """Per case, the median over processes (and its range) of each process's median
    block-pair slowdown: a block hit by another process's burst moves a process's total
    but not its median."""
    rows = []
    for label in labels:
        ok = [r for r in results if r["label"] == label and "error" not in r]
        failed = [r["error"] for r in results if r["label"] == label and "error" in r]
        row: dict[str, Any] = {"label": label, "runs": len(ok), "failed": failed}
        if ok:
            slow = [r["median_pair_slowdown_pct"] for r in ok]
            row.update(slowdown_median=statistics.median(slow), slowdown_min=min(slow))
            row.update(slowdown_max=max(slow))
            for key in (
                "slowdown_pct",
                "cpu_overhead_pct",
                "step_ms_unlogged",
                "to_backend_s",
                "finish_s",
                "loop_cpu_s",
                "delivery_wakeups_per_s",
                "delivery_cpu_pct",
            ):
                row[key] = statistics.median(r[key] for r in ok)
            row["to_backend_max_s"] = max(r["to_backend_s"] for r in ok)
            # not in older runs' results
            for key in ("in_calls_pct", "thread_cpu_pct", "thread_waits_pct", "helper_cpu_pct"):
                timed = [r[key] for r in ok if key in r]
                row[key] = statistics.median(timed) if timed else None
            row["loop_s"] = statistics.median(r["loop_s"] for r in ok)
            loads = [r["load_before"] for r in ok] + [r["load_after"] for r in ok]
            row.update(load_min=min(loads), load_max=max(loads))
        rows.append(row)
    none = next((row for row in rows if row["label"] == "none" and row["runs"]), None)
    for row in rows:
        if none is not None and row["runs"]:
            # Across fresh processes: the whole loop (half its steps logged) against `none`'s,
            # per logged step. It counts a background thread's work that spills into the
            # unlogged blocks, but carries the spread between processes.
            row["fresh_process_pct"] = (row["loop_s"] / none["loop_s"] - 1) * 2 * 100
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'case':<22} {'slowdown % median [min..max]':>30} {'total %':>8} {'CPU +%':>7} "
        f"{'step ms':>8} {'fresh %':>8} {'to backend s':>13} {'CPU s':>6} {'wake/s':>7} "
        f"{'calls %':>8} {'thread +%':>9} {'waits %':>8} {'helpers %':>9} {'load':>10}"
    )
    lines = [header]
    for row in rows:
        for error in row["failed"]:
            lines.append(f"{row['label']:<22} failed: {error}")
        if not row["runs"]:
            continue
        lines.append(
            f"{row['label']:<22} {row['slowdown_median']:>12.2f} "
            f"[{row['slowdown_min']:6.2f}..{row['slowdown_max']:6.2f}]{'':>3} "
            f"{row['slowdown_pct']:>8.2f} {row['cpu_overhead_pct']:>7.2f} "
            f"{row['step_ms_unlogged']:>8.2f} {row.get('fresh_process_pct', 0.0):>8.1f} "
            f"{row['to_backend_s']:>13.2f} "
            f"{row['loop_cpu_s']:>6.1f} {row['delivery_wakeups_per_s']:>7.1f} "
            f"{_or_nan(row['in_calls_pct']):>8.2f} {_or_nan(row['thread_cpu_pct']):>9.2f} "
            f"{_or_nan(row['thread_waits_pct']):>8.2f} {_or_nan(row['helper_cpu_pct']):>9.2f} "
            f"{row['load_min']:4.1f}-{row['load_max']:4.1f}"
        )
    return "\n".join(lines)


def _or_nan(value: float | None) -> float:
    """A figure older runs did not record prints as nan."""
    return float("nan") if value is None else value


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    """A bar per case: the median slowdown, with its range over processes as the error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if row["runs"]]
    medians = [row["slowdown_median"] for row in shown]
    spread = [
        [row["slowdown_median"] - row["slowdown_min"] for row in shown],
        [row["slowdown_max"] - row["slowdown_median"] for row in shown],
    ]
    figure, axes = plt.subplots(figsize=(8, 4))
    colors = ["tab:green" if row["label"].startswith("trackd") else "tab:gray" for row in shown]
    axes.bar([row["label"] for row in shown], medians, yerr=spread, color=colors, capsize=4)
    for index, value in enumerate(medians):
        axes.annotate(f"{value:.1f}", (index, value), ha="center", va="bottom", fontsize=8)
    axes.axhline(0, color="black", linewidth=0.5)
    axes.set_ylabel("training loop slowdown, % (median, min-max)")
    axes.set_title("2,000 steps of ~5 ms: 20 scalars/step, histogram/50, image/200")
    plt.setp(axes.get_xticklabels(), rotation=30, ha="right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated")
    parser.add_argument(
        "--trees", default="working=src", help="NAME=SRC,... for the trackd cases; SRC holds trackd"
    )
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
    parser.add_argument("--chart", type=Path, help="draw the PNG of a saved --save file, then stop")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.block, args.step_ms, args.batch, args.media, args.out)
        return
    if args.chart:  # the summary again from the saved processes, the table, the PNG
        saved = json.loads(args.chart.read_text())
        labels = list(dict.fromkeys(result["label"] for result in saved["results"]))
        rows = summarize(saved["results"], labels)
        print(table(rows))
        chart(rows, args.chart.with_suffix(".png"))
        print(f"wrote {args.chart.with_suffix('.png')}")
        return
    cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}; known: {', '.join(CASES)}")
    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    entries = []  # (label, case, src): the trackd cases once per tree
    for case in cases:
        for tree, src in trees.items() if case in TRACKD_CASES else [("", "src")]:
            label = f"{case}@{tree}" if tree and len(trees) > 1 else case
            entries.append((label, case, src))
    machine = {"cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    machine.update(provenance(sys.executable))
    results = []
    work = Path(tempfile.mkdtemp(prefix="trackd-train-services-"))
    server = None
    args.mlflow_uri = None
    try:
        if "mlflow" in cases:
            with (work / "services.log").open("ab") as log:
                server, args.mlflow_uri = start_mlflow_server(work, dict(os.environ), log)
        for repeat in range(args.repeats):
            order = entries if repeat % 2 == 0 else list(reversed(entries))
            for label, case, src in order:
                result = run_case(label, case, src, args)
                print(json.dumps({"repeat": repeat, **result}), flush=True)
                args.batch = args.batch or result.get("batch", 0)  # one batch size for all
                results.append(result)
                if args.save:  # after every process: a long run stopped early keeps its results
                    rows = summarize(results, [label for label, _, _ in entries])
                    report = {"machine": machine, "summary": rows, "results": results}
                    args.save.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if server is not None:
            stop_service(server)
        shutil.rmtree(work, ignore_errors=True)
    rows = summarize(results, [label for label, _, _ in entries])
    print(table(rows))
    if args.save and any(row["runs"] for row in rows):
        chart(rows, args.save.with_suffix(".png"))


if __name__ == "__main__":
    main()
