"""Soak: a steady row rate into jsonl + tensorboard for a long time; is the daemon flat?

    python benchmarks/soak.py                          # 30 minutes at 10,000 rows/s
    python benchmarks/soak.py --minutes 2              # a quick check of the harness
    python benchmarks/soak.py --retain 60              # TRACKD_RETAIN=60: the WAL stays bounded
    python benchmarks/soak.py --tracemalloc 60         # daemon under tracemalloc, top growth

A fresh daemon (`python -m trackd serve --sink jsonl:... --sink tensorboard:...`)
is started in a temporary directory, then `--clients` client processes each log
3 scalars per row, paced with time.sleep to `--rate` rows/s in total. Every
second the daemon's VmRSS (/proc/PID/status), utime+stime (/proc/PID/stat) and
the size of its WAL directory are sampled, with the control socket's `status`
(ingest rows, per-sink lag), into a CSV. At the end the clients stop and
`finish()`, the daemon is asked to `flush` (every sink caught up), the rows in
metrics.jsonl are counted, and the daemon is sent SIGTERM by its PID. Then the
PNG is drawn (needs matplotlib) and a summary is printed.

RSS growth is measured from the end of the warm-up (`--warmup` seconds, by
default a sixth of the run, at most 5 minutes) to the end of the load: the
median of the 30 samples before each point. The claim to hold is < 10 %.

WAL growth is by design: delivered segments are kept `retain` seconds (7 days
by default), so the WAL directory grows by the bytes written. `--retain 60`
sets TRACKD_RETAIN=60 for the daemon and shows it bounded.

With `--no-status` the control socket is not asked for `status` while the load
runs (only /proc and the WAL directory are read), as for a daemon nobody
watches: `status` is what trims the ingest-rate window (see SOAK.md).

With `--tracemalloc N` the daemon runs under a small wrapper that starts
tracemalloc and every N seconds writes the 25 allocation sites that grew most
since the first snapshot (taken after the warm-up) to tracemalloc.txt in the
output directory. It slows the daemon down a lot (on a busy machine enough for the
resend livelock in SOAK.md); use it to find a leak, not for figures.

`--window-probe N` instead runs the daemon under a wrapper that every N seconds
writes the length of `IngestStats._window` (the leak in SOAK.md) to NAME-window.txt.
The daemon's temporary directory is removed at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import proc_cpu_seconds, proc_status_kb

HERE = Path(__file__).resolve()
MIB = 1024 * 1024

TRACEMALLOC_WRAPPER = """
import os, runpy, sys, threading, time, tracemalloc
tracemalloc.start(int(os.environ.get("SOAK_TRACEMALLOC_FRAMES", "8")))
every = float(os.environ["SOAK_TRACEMALLOC_EVERY"])
warmup = float(os.environ["SOAK_TRACEMALLOC_WARMUP"])
out = os.environ["SOAK_TRACEMALLOC_OUT"]
def watch():
    time.sleep(warmup)
    first, started = tracemalloc.take_snapshot(), time.time()
    while True:
        time.sleep(every)
        snap = tracemalloc.take_snapshot()
        current, peak = tracemalloc.get_traced_memory()
        stats = snap.compare_to(first, "traceback")
        with open(out, "a") as f:
            f.write(f"=== +{time.time() - started:.0f}s after warm-up; traced "
                    f"{current / 2**20:.1f} MiB (peak {peak / 2**20:.1f})\\n")
            for stat in stats[:25]:
                f.write(f"{stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks "
                        f"now {stat.size / 1024:.1f} KiB\\n")
                for line in stat.traceback.format()[-8:]:
                    f.write("      " + line + "\\n")
threading.Thread(target=watch, daemon=True).start()
sys.argv = ["trackd", *sys.argv[1:]]
runpy.run_module("trackd", run_name="__main__", alter_sys=True)
"""

WINDOW_PROBE_WRAPPER = """
import gc, os, runpy, sys, threading, time
every = float(os.environ["SOAK_PROBE_EVERY"])
out = os.environ["SOAK_PROBE_OUT"]
def watch():
    from trackd.daemon.ingest import IngestStats
    started = time.time()
    while True:
        time.sleep(every)
        found = [o for o in gc.get_objects() if isinstance(o, IngestStats)]
        with open(out, "a") as f:
            for stats in found:
                window = stats._window
                f.write(f"{time.time() - started:.0f} s: IngestStats._window holds {len(window)} "
                        f"entries, messages {stats.messages}, rows {stats.rows}\\n")
threading.Thread(target=watch, daemon=True).start()
sys.argv = ["trackd", *sys.argv[1:]]
runpy.run_module("trackd", run_name="__main__", alter_sys=True)
"""


# --- a client process --------------------------------------------------------------------------


def client(index: int, rate: float, tick: float) -> None:
    """Log `rate` rows/s (3 scalars each) in bursts every `tick` s until stdin says stop."""
    import threading

    import trackd

    run = trackd.init(project="soak", name=f"client-{index}")
    stop = threading.Event()

    def wait_for_stop() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    print("ready", flush=True)
    log = run.log
    step = 0
    started = time.monotonic()
    late = 0.0
    while not stop.is_set():
        due = int((time.monotonic() - started) * rate)  # rows that should exist by now
        while step < due:
            log({"loss": 1.0 / (step + 1), "acc": step * 1e-9, "lr": 3e-4}, step)
            step += 1
        behind = time.monotonic() - started - step / rate
        late = max(late, behind)
        time.sleep(tick)
    logged = time.monotonic() - started
    flushed = run.flush(timeout=120)
    run.finish(timeout=30)
    print(
        json.dumps(
            {
                "index": index,
                "rows": step,
                "seconds": logged,
                "rows_per_second": step / logged,
                "flushed": flushed,
                "cpu_seconds": time.process_time(),
            }
        ),
        flush=True,
    )


# --- the daemon ------------------------------------------------------------------------------


def dir_bytes(path: Path) -> int:
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path):
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


class Daemon:
    def __init__(self, python: str, root: Path, args: argparse.Namespace) -> None:
        self.runtime_dir = root / "rt"
        self.data_dir = root / "data"
        self.jsonl_dir = root / "jsonl"
        self.tb_dir = root / "tensorboard"
        self.log_path = root / "daemon.log"
        serve = ["serve", "--log-level", "WARNING"]
        serve += ["--runtime-dir", str(self.runtime_dir), "--data-dir", str(self.data_dir)]
        serve += ["--sink", f"jsonl:{self.jsonl_dir}", "--sink", f"tensorboard:{self.tb_dir}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKD_")}
        if args.retain is not None:
            env["TRACKD_RETAIN"] = str(args.retain)
        if args.segment_mb:
            env["TRACKD_WAL_SEGMENT_BYTES"] = str(int(args.segment_mb * MIB))
        if args.window_probe:
            env["SOAK_PROBE_EVERY"] = str(args.window_probe)
            env["SOAK_PROBE_OUT"] = str(args.out / f"{args.name}-window.txt")
            command = [python, "-c", WINDOW_PROBE_WRAPPER, *serve]
        elif args.tracemalloc:
            env["SOAK_TRACEMALLOC_EVERY"] = str(args.tracemalloc)
            env["SOAK_TRACEMALLOC_WARMUP"] = str(args.warmup)
            env["SOAK_TRACEMALLOC_OUT"] = str(args.out / "tracemalloc.txt")
            command = [python, "-c", TRACEMALLOC_WRAPPER, *serve]
        else:
            command = [python, "-m", "trackd", *serve]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.pid = self.process.pid
        deadline = time.monotonic() + 30
        while not self.request("status", timeout=0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"daemon did not start: {self.log_path.read_text()}")
            time.sleep(0.1)

    def request(self, command: str, **arguments: Any) -> Any:
        from trackd.client.control import DaemonUnreachable, request

        try:
            return request(command, runtime_dir=str(self.runtime_dir), **arguments)
        except DaemonUnreachable:
            return None

    def env(self) -> dict[str, str]:
        return {"TRACKD_RUNTIME_DIR": str(self.runtime_dir), "TRACKD_DATA_DIR": str(self.data_dir)}

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.process.wait()


# --- the soak ------------------------------------------------------------------------------------

FIELDS = [
    "t",
    "rss_mb",
    "cpu_seconds",
    "cpu_percent",
    "wal_mb",
    "wal_segments",
    "ingest_rows",
    "rows_per_second",
    "jsonl_lag_records",
    "tensorboard_lag_records",
    "threads",
]


def sample(daemon: Daemon, t0: float, last: dict[str, Any], no_status: bool) -> dict[str, Any]:
    now = time.monotonic()
    cpu = proc_cpu_seconds(daemon.pid)
    row: dict[str, Any] = {
        "t": round(now - t0, 2),
        "rss_mb": round(proc_status_kb(daemon.pid, "VmRSS") / 1024, 2),
        "threads": proc_status_kb(daemon.pid, "Threads"),
        "cpu_seconds": round(cpu, 2),
        "cpu_percent": round(100 * (cpu - last["cpu"]) / max(now - last["t"], 1e-6), 1),
        "wal_mb": round(dir_bytes(daemon.data_dir / "wal") / MIB, 3),
    }
    status = {} if no_status else daemon.request("status", timeout=2.0) or {}
    rows = status.get("ingest", {}).get("rows")
    row["ingest_rows"] = rows
    if rows is not None and last.get("rows") is not None:
        row["rows_per_second"] = round((rows - last["rows"]) / max(now - last["t"], 1e-6), 1)
    row["wal_segments"] = status.get("wal", {}).get("segments")
    for worker in status.get("sinks", {}).values():
        kind = str(worker.get("spec", "")).split(":", 1)[0]
        row[f"{kind}_lag_records"] = worker.get("lag_records")
    last.update(cpu=cpu, t=now, rows=rows)
    return row


def count_jsonl_rows(root: Path) -> int:
    rows = 0
    for path in root.rglob("*.jsonl"):
        with path.open("rb") as f:
            rows += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return rows


def soak(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="trackd-soak-"))
    args.out.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(args.python, work, args)
    env = {**os.environ, **daemon.env()}
    env.pop("TRACKD_ENDPOINT", None)
    clients: list[subprocess.Popen[str]] = []
    samples: list[dict[str, Any]] = []
    result: dict[str, Any] = {"work_dir": str(work), "daemon_pid": daemon.pid}
    csv_path = args.out / f"{args.name}.csv"
    try:
        idle_rss = proc_status_kb(daemon.pid, "VmRSS") / 1024
        per_client = args.rate / args.clients
        for index in range(args.clients):
            command = [args.python, str(HERE), "--client", str(index)]
            command += ["--rate", str(per_client), "--tick", str(args.tick)]
            clients.append(
                subprocess.Popen(
                    command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
            )
        for process in clients:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("a client failed to start")
        t0 = time.monotonic()
        last = {"cpu": proc_cpu_seconds(daemon.pid), "t": t0, "rows": None}
        end = t0 + args.minutes * 60
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
            writer.writeheader()
            tick = t0
            while tick < end:
                tick += 1.0
                time.sleep(max(0.0, tick - time.monotonic()))
                if daemon.process.poll() is not None:
                    raise RuntimeError(f"daemon exited: {daemon.log_path.read_text()[-2000:]}")
                row = sample(daemon, t0, last, args.no_status)
                samples.append(row)
                writer.writerow(row)
                f.flush()
                if args.verbose and len(samples) % 60 == 0:
                    print(json.dumps(row), flush=True)
        load_seconds = time.monotonic() - t0
        for process in clients:
            assert process.stdin is not None
            process.stdin.write("stop\n")
            process.stdin.flush()
        reports = []
        for process in clients:
            assert process.stdout is not None
            out, _ = process.communicate(timeout=300)
            reports.append(json.loads(out.strip().splitlines()[-1]))
        drain_started = time.monotonic()
        caught_up = daemon.request("flush", wait=300.0, timeout=310.0)
        result.update(
            idle_rss_mb=round(idle_rss, 1),
            load_seconds=round(load_seconds, 1),
            drain_seconds=round(time.monotonic() - drain_started, 1),
            sinks_caught_up=caught_up,
            clients=reports,
            status=daemon.request("status", timeout=5.0),
            peak_rss_mb=round(proc_status_kb(daemon.pid, "VmHWM") / 1024, 1),
        )
    finally:
        for process in clients:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait()
        daemon.stop()
    result["rows_in_jsonl"] = count_jsonl_rows(daemon.jsonl_dir)
    result["tensorboard_mb"] = round(
        sum(p.stat().st_size for p in daemon.tb_dir.rglob("*") if p.is_file()) / MIB, 1
    )
    result["summary"] = summarise(samples, result, args)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def median_before(samples: list[dict[str, Any]], t: float, key: str, window: int = 30) -> float:
    before = [s[key] for s in samples if s["t"] <= t][-window:]
    return statistics.median(before)


def summarise(samples: list[dict[str, Any]], result: dict[str, Any], args: argparse.Namespace):
    end_t = samples[-1]["t"]
    warm_t = min(args.warmup, end_t / 2)
    after = [s for s in samples if s["t"] > warm_t]
    rss_warm = median_before(samples, warm_t, "rss_mb")
    rss_end = median_before(samples, end_t, "rss_mb")
    rows_logged = sum(c["rows"] for c in result.get("clients", []))
    ingested = [s["ingest_rows"] for s in samples if s["ingest_rows"] is not None]
    summary = {
        "minutes": round(end_t / 60, 2),
        "target_rows_per_second": args.rate,
        "rows_logged": rows_logged,
        "rows_per_second_logged": round(rows_logged / result["load_seconds"], 1),
        "rows_per_second_ingested": (
            round((ingested[-1] - ingested[0]) / end_t, 1) if ingested else None
        ),
        "rows_in_jsonl": result["rows_in_jsonl"],
        "daemon_cpu_percent_mean": round(
            (samples[-1]["cpu_seconds"] - samples[0]["cpu_seconds"]) / end_t * 100, 1
        ),
        "daemon_cpu_percent_p95_1s": round(
            statistics.quantiles([s["cpu_percent"] for s in samples], n=20)[-1], 1
        ),
        "warmup_seconds": warm_t,
        "rss_idle_mb": result.get("idle_rss_mb"),
        "rss_warmup_mb": rss_warm,
        "rss_end_mb": rss_end,
        "rss_growth_percent": round(100 * (rss_end - rss_warm) / rss_warm, 1),
        "rss_max_after_warmup_mb": max(s["rss_mb"] for s in after),
        "rss_min_after_warmup_mb": min(s["rss_mb"] for s in after),
        "peak_rss_mb": result.get("peak_rss_mb"),
        "wal_mb_by_minute": {
            f"{minute}": next((s["wal_mb"] for s in samples if s["t"] >= minute * 60), None)
            for minute in range(0, int(end_t // 60) + 1, max(1, int(end_t // 60) // 10))
        },
        "wal_mb_end": samples[-1]["wal_mb"],
        "wal_mb_max": max(s["wal_mb"] for s in samples),
        "max_lag_records": {
            kind: max((s.get(f"{kind}_lag_records") or 0) for s in samples)
            for kind in ("jsonl", "tensorboard")
        },
        "retain_seconds": args.retain if args.retain is not None else 7 * 24 * 3600,
        "sinks_caught_up": result.get("sinks_caught_up"),
        "drain_seconds": result.get("drain_seconds"),
    }
    return summary


def plot(csv_path: Path, png: Path, summary: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    minutes = [float(r["t"]) / 60 for r in rows]

    def column(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]

    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    axes[0].plot(minutes, column("rss_mb"), lw=0.8)
    axes[0].axvline(summary["warmup_seconds"] / 60, color="grey", ls="--", lw=0.8)
    axes[0].axhline(summary["rss_warmup_mb"] * 1.1, color="red", ls=":", lw=0.8)
    axes[0].set_ylabel("daemon RSS (MiB)")
    axes[0].set_ylim(bottom=0)
    axes[0].set_title(
        f"{title}: RSS {summary['rss_warmup_mb']:.0f} → {summary['rss_end_mb']:.0f} MiB "
        f"({summary['rss_growth_percent']:+.1f} %; red = warm-up + 10 %)",
        fontsize=9,
    )
    axes[1].plot(minutes, column("cpu_percent"), lw=0.5)
    axes[1].set_ylabel("daemon CPU (% of a core)")
    axes[1].set_ylim(bottom=0)
    axes[2].plot(minutes, column("wal_mb"), lw=0.8)
    axes[2].set_ylabel("WAL dir (MiB)")
    axes[2].set_ylim(bottom=0)
    axes[3].plot(minutes, column("rows_per_second"), lw=0.5, label="ingested rows/s")
    axes[3].set_ylabel("rows/s")
    axes[3].set_ylim(bottom=0)
    lag = axes[3].twinx()
    lag.plot(minutes, column("jsonl_lag_records"), lw=0.5, color="tab:orange", label="jsonl lag")
    lag.plot(minutes, column("tensorboard_lag_records"), lw=0.5, color="tab:green", label="tb lag")
    lag.set_ylabel("sink lag (WAL records)")
    axes[3].legend(loc="lower left", fontsize=8)
    lag.legend(loc="lower right", fontsize=8)
    axes[3].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def print_table(summary: dict[str, Any]) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=10_000.0, help="rows/s, all clients")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--tick", type=float, default=0.01, help="client sleep between bursts")
    parser.add_argument("--warmup", type=float, default=None, help="seconds (default: run/6)")
    parser.add_argument("--retain", type=float, default=None, help="TRACKD_RETAIN for the daemon")
    parser.add_argument("--segment-mb", type=float, default=None, help="WAL segment size")
    parser.add_argument("--tracemalloc", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument(
        "--no-status",
        action="store_true",
        help="sample /proc and the WAL only, never the control socket's status",
    )
    parser.add_argument(
        "--window-probe",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="every SECONDS, write the length of the daemon's ingest-rate window",
    )
    parser.add_argument("--python", default=sys.executable, help="for the daemon and clients")
    parser.add_argument("--out", type=Path, default=HERE.parent, help="for soak.csv/.png/.json")
    parser.add_argument("--name", default="soak", help="file stem in --out")
    parser.add_argument("--keep", action="store_true", help="keep the daemon's temporary dir")
    parser.add_argument("--verbose", action="store_true", help="print a sample every minute")
    parser.add_argument("--client", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        client(args.client, args.rate, args.tick)
        return
    if args.warmup is None:
        args.warmup = min(300.0, args.minutes * 60 / 6)
    result = soak(args)
    csv_path = args.out / f"{args.name}.csv"
    result["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": subprocess.run(
            ["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout.strip(),
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str))
    summary = result["summary"]
    print_table(summary)
    retain = "7 d (default)" if args.retain is None else f"{args.retain:g} s"
    title = f"{summary['minutes']:g} min at {args.rate:g} rows/s, retain {retain}"
    try:
        plot(csv_path, args.out / f"{args.name}.png", summary, title)
    except ImportError:
        print("no matplotlib: no PNG (pip install matplotlib)", file=sys.stderr)
    verdict = "flat" if summary["rss_growth_percent"] <= 10 else "GREW"
    print(f"RSS {verdict}: {summary['rss_growth_percent']:+.1f} % after warm-up")


if __name__ == "__main__":
    main()
