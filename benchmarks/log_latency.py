"""Per-call latency and client CPU of `run.log()` with 3 scalars, beside its peers.

    python benchmarks/log_latency.py                     # everything, peers from this interpreter
    python benchmarks/log_latency.py --cases trackd-up,floor --calls-scale 0.2
    python benchmarks/log_latency.py --peer-python .venv-bench/bin/python

Every measured thing runs in a fresh subprocess of this script (`--worker CASE`),
so no import, thread or socket of one case can disturb another. A worker warms
up, flushes, then times each call with `perf_counter_ns` around it (the value
dict is built outside the timed region) and reads `time.process_time()` (all
threads of the process) from before the loop until the library's flush
returns; CPU per call is that difference divided by the calls.

trackd is measured in three daemon states, each with a daemon of its own in a
fresh temporary directory: daemon up (default JSONL sink, and every row is
counted in metrics.jsonl afterwards), no daemon at all (the client keeps rows
in memory, then spools them), and daemon up with its only sink failing (a
JSONL sink under /proc, which cannot be created; `trackd status --json` is
checked to report the failure). Peers: wandb offline (never online), mlflow
`log_metrics(synchronous=False)` to a file store, tensorboardX `add_scalar`x3,
trackio `log` (local SQLite), aim `track` (optional), and the floor: msgpack
pack + zmq NOBLOCK PUSH send over ipc to a receiving process.

Only ipc sockets and local files are used; every process this script starts is
ended by its PID.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from machine import provenance, wait_for_quiet
from stalls import SLOW_NS, StallProbe

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"

# name -> (description, default calls, runs on the peer interpreter?)
CASES: dict[str, tuple[str, int, bool]] = {
    "harness": ("timer harness: a no-op call", 300_000, False),
    "floor": ("floor: msgpack pack + zmq NOBLOCK PUSH (ipc)", 300_000, False),
    "trackd-up": ("trackd run.log, daemon up", 300_000, False),
    "trackd-nodaemon": ("trackd run.log, no daemon", 300_000, False),
    "trackd-sinkfail": ("trackd run.log, daemon up, sink failing", 300_000, False),
    "trackio": ("trackio log (local SQLite)", 50_000, True),
    "tensorboardX": ("tensorboardX add_scalar x3", 30_000, True),
    "wandb": ("wandb log, offline", 20_000, True),
    "mlflow": ("mlflow log_metrics(synchronous=False), file store", 5_000, True),
    "mlflow-sqlite": ("mlflow log_metrics(synchronous=False), SQLite", 5_000, True),
    "aim": ("aim track (dict of 3)", 10_000, True),
}
FAILING_SINK = "jsonl:/proc/trackd-bench"
WORKER_TIMEOUT = 600.0


# --- the worker: one case in a fresh process ------------------------------------------------


def _values(i: int) -> dict[str, float]:
    return {"loss": 1.0 / (i + 1), "acc": i * 1e-7, "lr": 3e-4}


@dataclass
class Adapter:
    """How a worker drives one library."""

    log: Callable[[dict[str, float], int], Any]  # log(values, step)
    flush: Callable[[], Any]  # returns once everything logged is stored (the CPU window ends)
    close: Callable[[], Any] = lambda: None
    settle: Callable[[], Any] | None = None  # after the warm-up; default `flush`


def _setup_harness(case: str, work: Path, info: dict[str, Any]) -> Adapter:
    def noop(values: dict[str, float], step: int) -> None:
        pass

    return Adapter(noop, lambda: None)


def _setup_floor(case: str, work: Path, info: dict[str, Any]) -> Adapter:
    import msgpack
    import zmq

    context = zmq.Context()
    push = context.socket(zmq.PUSH)  # default SNDHWM (1000), as a naive client would
    push.connect(os.environ["BENCH_FLOOR_ADDRESS"])
    time.sleep(0.2)  # let the connection come up before the first send
    pack, send, again, noblock = msgpack.packb, push.send, zmq.Again, zmq.NOBLOCK
    clock = time.time
    dropped = [0]

    def floor(values: dict[str, float], step: int) -> None:
        try:
            send(pack((step, clock(), values)), noblock)
        except again:
            dropped[0] += 1

    def floor_close() -> None:
        info["dropped_eagain"] = dropped[0]
        push.close(linger=2000)
        context.term()

    return Adapter(floor, lambda: None, floor_close)


def _setup_trackd(case: str, work: Path, info: dict[str, Any]) -> Adapter:
    import trackd

    run = trackd.init(project="bench", name=case)
    info["run_id"] = run.id
    info["trackd_version"] = trackd.__version__
    timeout = 2.0 if case == "trackd-nodaemon" else 120.0

    def trackd_flush() -> None:
        info.setdefault("flush_results", []).append(run.flush(timeout=timeout))

    def trackd_close() -> None:
        started, cpu = time.perf_counter(), time.process_time()
        run.finish(timeout=timeout)
        info["finish_seconds"] = time.perf_counter() - started
        info["finish_cpu_seconds"] = time.process_time() - cpu

    return Adapter(run.log, trackd_flush, trackd_close)


def _setup_trackio(case: str, work: Path, info: dict[str, Any]) -> Adapter:
    import trackio

    info["version"] = trackio.__version__
    trackio.init(project="bench", name="trackio-bench", embed=False)
    # No flush API: finish() sends what is queued and waits for it; it is the flush.
    return Adapter(trackio.log, trackio.finish, settle=_pause)


def _setup_tensorboardx(case: str, work: Path, info: dict[str, Any]) -> Adapter:
    import tensorboardX

    info["version"] = tensorboardX.__version__
    writer = tensorboardX.SummaryWriter(str(work / "tb"))
    add = writer.add_scalar

    def tb_log(values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            add(key, value, step)

    return Adapter(tb_log, writer.flush, writer.close)


def _setup_wandb(case: str, work: Path, info: dict[str, Any]) -> Adapter:
    import wandb

    if os.environ.get("WANDB_MODE") != "offline":
        raise SystemExit("wandb runs offline only")
    info["version"] = wandb.__version__
    run = wandb.init(project="bench", name="wandb-bench", mode="offline")
    # No flush API: finish() is the only point where everything logged is stored.
    return Adapter(run.log, run.finish, settle=_pause)


def _setup_mlflow(case: str, work: Path, info: dict[str, Any]) -> Adapter:
    import mlflow

    info["version"] = mlflow.__version__
    if case == "mlflow-sqlite":
        mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    mlflow.set_experiment("bench")
    mlflow.start_run(run_name="mlflow-bench")
    log_metrics = mlflow.log_metrics

    def mlflow_log(values: dict[str, float], step: int) -> None:
        log_metrics(values, step=step, synchronous=False)

    return Adapter(mlflow_log, mlflow.flush_async_logging, mlflow.end_run)


def _setup_aim(case: str, work: Path, info: dict[str, Any]) -> Adapter:
    import aim

    info["version"] = aim.__version__.__version__
    run = aim.Run(repo=str(work / "aim"), experiment="bench")
    track = run.track

    def aim_log(values: dict[str, float], step: int) -> None:
        track(values, step=step)

    # aim writes in the caller's thread; close() finalizes the run.
    return Adapter(aim_log, lambda: None, run.close)


SETUPS: dict[str, Callable[[str, Path, dict[str, Any]], Adapter]] = {
    "harness": _setup_harness,
    "floor": _setup_floor,
    "trackd-up": _setup_trackd,
    "trackd-nodaemon": _setup_trackd,
    "trackd-sinkfail": _setup_trackd,
    "trackio": _setup_trackio,
    "tensorboardX": _setup_tensorboardx,
    "wandb": _setup_wandb,
    "mlflow": _setup_mlflow,
    "mlflow-sqlite": _setup_mlflow,
    "aim": _setup_aim,
}


def _pause() -> None:
    """After the warm-up of a library without a flush: give its sender time to drain."""
    time.sleep(2.0)


def worker(case: str, calls: int, warmup: int, out: Path, work: Path, stalls: bool) -> None:
    info: dict[str, Any] = {}
    adapter = SETUPS[case](case, work, info)
    probe = StallProbe() if stalls else None
    log, flush = adapter.log, adapter.flush
    clock = time.perf_counter_ns
    for i in range(warmup):
        log(_values(i), i)
    (adapter.settle or flush)()
    samples = [0] * calls
    # Each row is built just before its call, outside the timed region: a list of all the
    # rows built up front would give the garbage collector 10^5 more objects to traverse,
    # and its full collections would show up in the tail of whatever allocates.
    if probe is not None:
        probe.install()
    slow = probe.slow if probe is not None else None
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    step = warmup
    for j in range(calls):
        row = {"loss": 1.0 / (step + 1), "acc": step * 1e-7, "lr": 3e-4}
        started = clock()
        log(row, step)
        took = samples[j] = clock() - started
        if slow is not None and took > SLOW_NS:
            slow.append((started, took))
        step += 1
    loop_seconds = time.perf_counter() - wall_start
    if probe is not None:
        probe.uninstall()
        info["stalls"] = probe.attribute()
    flush()
    cpu_seconds = time.process_time() - cpu_start
    flush_seconds = time.perf_counter() - wall_start - loop_seconds
    adapter.close()
    samples.sort()
    result = {
        "case": case,
        "calls": calls,
        "warmup": warmup,
        "loop_seconds": loop_seconds,
        "flush_seconds": flush_seconds,
        "cpu_seconds": cpu_seconds,
        "cpu_us_per_call": cpu_seconds / calls * 1e6,
        "mean_us": sum(samples) / calls / 1e3,
        **{f"p{label}_us": _percentile(samples, q) / 1e3 for label, q in _QUANTILES},
        "max_us": samples[-1] / 1e3,
        "calls_over_100us": calls - bisect.bisect_right(samples, 100_000),
        "calls_over_1ms": calls - bisect.bisect_right(samples, 1_000_000),
        "info": info,
    }
    out.write_text(json.dumps(result, default=str))


_QUANTILES = (("50", 0.50), ("99", 0.99), ("99.9", 0.999), ("99.99", 0.9999))


def _percentile(ordered: list[int], q: float) -> int:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def receiver(address: str) -> None:
    """The floor's other end: a PULL socket that unpacks every message, until SIGTERM."""
    import msgpack
    import zmq

    received = 0

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind(address)
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            msgpack.unpackb(pull.recv())
            received += 1
    print(f"received {received}", flush=True)
    pull.close(linger=0)
    context.term()


# --- the orchestrator -----------------------------------------------------------------------


class Daemon:
    """`python -m trackd serve` in a temporary directory, ended by its PID."""

    def __init__(self, python: str, root: Path, sinks: list[str]) -> None:
        self.python = python
        self.runtime_dir = root / "rt"
        self.data_dir = root / "data"
        self.log_path = root / "daemon.log"
        args = [python, "-m", "trackd", "serve", "--log-level", "WARNING"]
        args += ["--runtime-dir", str(self.runtime_dir), "--data-dir", str(self.data_dir)]
        for spec in sinks:
            args += ["--sink", spec]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while self.status() is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"daemon did not start: {self.log_path.read_text()}")
            time.sleep(0.1)

    def status(self) -> dict[str, Any] | None:
        done = subprocess.run(
            [
                self.python,
                "-m",
                "trackd",
                "status",
                "--json",
                "--runtime-dir",
                str(self.runtime_dir),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        return json.loads(done.stdout) if done.returncode == 0 else None

    def env(self) -> dict[str, str]:
        return {"TRACKD_RUNTIME_DIR": str(self.runtime_dir), "TRACKD_DATA_DIR": str(self.data_dir)}

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _peer_env(work: Path) -> dict[str, str]:
    """Everything offline and local: no telemetry, no hub, no W&B cloud."""
    return {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(work / "wandb"),
        "WANDB_CACHE_DIR": str(work / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(work / "wandb-config"),
        "WANDB_DISABLE_GIT": "true",
        "WANDB__DISABLE_STATS": "true",
        "MLFLOW_TRACKING_URI": (work / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",  # 3.x refuses file stores unless told
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TRACKIO_DIR": str(work / "trackio"),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "AIM_UI_TELEMETRY_ENABLED": "0",
        "DO_NOT_TRACK": "1",
    }


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    description, default_calls, on_peer = CASES[case]
    python = args.peer_python if on_peer else args.python
    calls = max(1000, int(default_calls * args.calls_scale))
    warmup = max(100, min(2000, calls // 50))
    work = Path(tempfile.mkdtemp(prefix=f"trackd-bench-{case}-"))
    out = work / "result.json"
    env = {**os.environ, **_peer_env(work)}
    env.pop("TRACKD_ENDPOINT", None)
    daemon: Daemon | None = None
    helper: subprocess.Popen[str] | None = None
    checks: dict[str, Any] = {}
    try:
        if case in ("trackd-up", "trackd-sinkfail"):
            sinks = [FAILING_SINK] if case == "trackd-sinkfail" else []
            daemon = Daemon(args.python, work, sinks)
            env.update(daemon.env())
            if case == "trackd-sinkfail":
                checks["sink_before"] = _wait_sink_failing(daemon)
        elif case == "trackd-nodaemon":
            env.update(TRACKD_RUNTIME_DIR=str(work / "rt"), TRACKD_DATA_DIR=str(work / "data"))
            (work / "rt").mkdir(mode=0o700)
        elif case == "floor":
            address = f"ipc://{work}/floor.sock"
            env["BENCH_FLOOR_ADDRESS"] = address
            helper = subprocess.Popen(
                [args.python, str(HERE), "--receiver", address],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert helper.stdout is not None
            helper.stdout.readline()  # "ready"
        checks["machine_busy_before"] = round(wait_for_quiet(args.quiet_wait), 3)
        command = [python, str(HERE), "--worker", case, "--calls", str(calls)]
        command += ["--warmup", str(warmup), "--out", str(out), "--work", str(work)]
        command += ["--stalls"] if args.stalls else []
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT, check=False
        )
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
            return {"case": case, "description": description, "error": " | ".join(tail)}
        result: dict[str, Any] = json.loads(out.read_text())
        if case == "trackd-up":
            assert daemon is not None
            checks["rows_expected"] = calls + warmup
            checks["rows_in_sink"] = _rows_delivered(daemon, args.python)
        elif case == "trackd-sinkfail":
            assert daemon is not None
            checks["sink_after"] = _sink_state(daemon)
        elif case == "trackd-nodaemon":
            spools = list((work / "data" / "spool").glob("*.spool"))
            checks["spool_bytes"] = sum(path.stat().st_size for path in spools)
        elif case == "floor" and helper is not None:
            os.kill(helper.pid, signal.SIGTERM)
            received, _ = helper.communicate(timeout=30)
            checks["received"] = int(received.split()[-1])
            helper = None
        result["checks"] = checks
        result["description"] = description
        result["python"] = python
        return result
    except subprocess.TimeoutExpired:
        return {"case": case, "description": description, "error": "timed out"}
    except Exception as exc:  # one broken case must not cost the others
        return {"case": case, "description": description, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if helper is not None and helper.poll() is None:
            os.kill(helper.pid, signal.SIGTERM)
            helper.wait(timeout=30)
        if daemon is not None:
            daemon.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _sink_state(daemon: Daemon) -> dict[str, Any]:
    status = daemon.status() or {}
    (sink,) = status["sinks"].values()
    return {
        key: sink[key] for key in ("spec", "delivered_rows", "retries", "last_error", "lag_bytes")
    }


def _wait_sink_failing(daemon: Daemon) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        state = _sink_state(daemon)
        if state["retries"] > 0 and state["last_error"]:
            return state
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sink is not failing: {state}")
        time.sleep(0.2)


def _rows_delivered(daemon: Daemon, python: str) -> int:
    code = (
        "import sys; from trackd.client.control import request;"
        "print(request('flush', runtime_dir=sys.argv[1], wait=120, timeout=130))"
    )
    subprocess.run([python, "-c", code, str(daemon.runtime_dir)], check=True, capture_output=True)
    files = (daemon.data_dir / "runs").glob("*/*/metrics.jsonl")
    return sum(sum(1 for _ in path.open("rb")) for path in files)


# --- import cost ------------------------------------------------------------------------------


def import_times(python: str, peer_python: str, repeats: int, peers: bool) -> dict[str, Any]:
    def median_ms(exe: str, code: str, n: int) -> float:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            subprocess.run([exe, "-c", code], check=True, capture_output=True)
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)

    baseline = median_ms(python, "pass", repeats)
    trackd_ms = median_ms(python, "import trackd", repeats)
    done = subprocess.run(
        [python, "-X", "importtime", "-c", "import trackd"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = []
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match:
            self_us, cumulative_us, indent, name = match.groups()
            lines.append((int(cumulative_us), int(self_us), len(indent) // 2, name))
    trackd_line = next(line for line in lines if line[3] == "trackd")
    heaviest = sorted(lines, reverse=True)[:12]
    third_party = sorted(
        {
            name.split(".")[0]
            for _, _, _, name in lines
            if name.split(".")[0] not in sys.stdlib_module_names
            and name.split(".")[0] not in ("trackd", "_distutils_hack", "sitecustomize")
        }
    )
    result: dict[str, Any] = {
        "python_pass_ms": baseline,
        "import_trackd_ms": trackd_ms,
        "import_trackd_minus_pass_ms": trackd_ms - baseline,
        "importtime_trackd_cumulative_ms": trackd_line[0] / 1e3,
        "importtime_heaviest": [
            {"module": name, "cumulative_ms": cum / 1e3, "self_ms": own / 1e3, "depth": depth}
            for cum, own, depth, name in heaviest
        ],
        "third_party_modules_imported": third_party,
        "sink_libraries_imported": [
            name
            for name in ("wandb", "mlflow", "aim", "numpy", "tensorboardX")
            if name in third_party
        ],
    }
    if peers:
        peer_base = median_ms(peer_python, "pass", 5)
        peers = ("zmq", "msgpack", "tensorboardX", "trackio", "wandb", "mlflow", "aim")
        installed = [
            module
            for module in peers
            if subprocess.run(
                [peer_python, "-c", f"import {module}"], check=False, capture_output=True
            ).returncode
            == 0
        ]
        result["peers_minus_pass_ms"] = {
            module: median_ms(peer_python, f"import {module}", 5) - peer_base
            for module in installed
        }
    return result


# --- report -----------------------------------------------------------------------------------

TARGETS = {
    "p50_us": 3.0,
    "p99_us": 30.0,
    "p99.9_us": 200.0,
    "p99.99_us": 100.0,
    "max_us": 10_000.0,
    "cpu_us_per_call": 5.0,
}


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'case':<52} {'calls':>7} {'p50':>8} {'p99':>8} {'p99.9':>8} {'p99.99':>8} {'max':>9} "
        f"{'>1ms':>5} {'CPU/call':>9}"
    )
    lines = [head, "-" * len(head)]
    for result in results:
        name = result["description"]
        if "error" in result:
            lines.append(f"{name:<52} failed: {result['error'][:200]}")
            continue
        cells = [f"{result[key]:8.1f}" for key in ("p50_us", "p99_us", "p99.9_us", "p99.99_us")]
        cells.append(f"{result['max_us']:9.0f}")
        cells.append(f"{result['calls_over_1ms']:5d}")
        cells.append(f"{result['cpu_us_per_call']:9.1f}")
        marks = ""
        if result["case"].startswith("trackd"):
            missed = [key for key, limit in TARGETS.items() if result[key] > limit]
            marks = "  misses: " + ", ".join(missed) if missed else "  all targets met"
        lines.append(f"{name:<52} {result['calls']:>7} " + " ".join(cells) + marks)
    lines.append(
        "(µs; >1ms = calls that took over 1 ms; CPU/call = process CPU, all threads, "
        "from before the loop until flush returns)"
    )
    return "\n".join(lines)


def checks_text(results: list[dict[str, Any]]) -> str:
    lines = []
    for result in results:
        info, checks = result.get("info", {}), result.get("checks", {})
        case = result["case"]
        if "stalls" in info:
            lines.append(f"{case}: slow calls by cause: {json.dumps(info['stalls'])}")
        if case == "floor" and checks:
            lines.append(
                f"floor: {info.get('dropped_eagain', 0)} of {result['calls'] + result['warmup']} "
                f"sends hit EAGAIN (dropped); the receiver got {checks['received']}"
            )
        elif case == "trackd-up" and checks:
            lines.append(
                f"trackd-up: {checks['rows_in_sink']} of {checks['rows_expected']} rows in "
                f"metrics.jsonl; flush {result['flush_seconds'] * 1e3:.0f} ms after the loop"
            )
        elif case == "trackd-nodaemon" and checks:
            lines.append(
                f"trackd-nodaemon: flush(timeout=2) -> {info.get('flush_results')}; "
                f"finish() spooled {checks['spool_bytes']:,} bytes in "
                f"{info.get('finish_seconds', 0):.2f} s ("
                f"{info.get('finish_cpu_seconds', 0) / result['calls'] * 1e6:.2f} CPU µs/call more)"
            )
        elif case == "trackd-sinkfail" and checks:
            after = checks["sink_after"]
            lines.append(
                f"trackd-sinkfail: sink {after['spec']}: retries {after['retries']}, delivered "
                f"rows {after['delivered_rows']}, lag {after['lag_bytes']:,} bytes, "
                f"last error {after['last_error']!r}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter for trackd cases")
    parser.add_argument("--peer-python", default=sys.executable, help="interpreter for peers")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated")
    parser.add_argument("--calls-scale", type=float, default=1.0, help="scale every case's calls")
    parser.add_argument("--import-repeats", type=int, default=20)
    parser.add_argument(
        "--quiet-wait", type=float, default=60.0, help="max seconds to wait for an idle machine"
    )
    parser.add_argument("--no-imports", action="store_true", help="skip the import measurements")
    parser.add_argument(
        "--only-imports",
        action="store_true",
        help="measure imports only; with --save, replace the imports of an existing report",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument(
        "--stalls",
        action="store_true",
        help="attribute each call over 100 µs to a collection, the delivery thread or the OS",
    )
    parser.add_argument("--save", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--receiver", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.calls, args.warmup, args.out, args.work, args.stalls)
        return
    if args.receiver:
        receiver(args.receiver)
        return

    # SIGTERM: unwind, so that every daemon and helper started so far is ended by its PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}; known: {', '.join(CASES)}")
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        **provenance(args.python),
    }
    print(f"machine: {machine['cpu_model']}, {machine['cpus']} CPUs, Python {machine['python']}")
    print(f"trackd {machine['commit']} from {machine['trackd_source']}")
    if machine["src_changes_not_committed"]:
        print(f"  uncommitted in src/: {machine['src_changes_not_committed']}")
    imports = None
    if not args.no_imports:
        any_peer = any(CASES[case][2] for case in cases)
        busy = wait_for_quiet(args.quiet_wait)
        imports = import_times(args.python, args.peer_python, args.import_repeats, any_peer)
        imports["machine_busy_before"] = round(busy, 3)
        print(_imports_text(imports), flush=True)
    if args.only_imports:
        if imports is not None and args.save:
            report = json.loads(args.save.read_text()) if args.save.exists() else {}
            report["imports"] = {**imports, "machine": machine}
            args.save.write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"updated the imports in {args.save}")
        return
    results = []
    for case in cases:
        print(f"running {case} ...", flush=True)
        results.append(run_case(case, args))
    print()
    print(table(results))
    print(checks_text(results))
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        report = {"machine": machine, "imports": imports, "results": results}
        args.save.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"saved {args.save}")


def _imports_text(imports: dict[str, Any]) -> str:
    lines = [
        f"import trackd: {imports['import_trackd_ms']:.1f} ms wall (median), "
        f"python -c pass: {imports['python_pass_ms']:.1f} ms, "
        f"difference {imports['import_trackd_minus_pass_ms']:.1f} ms; "
        f"-X importtime cumulative for trackd: {imports['importtime_trackd_cumulative_ms']:.1f} ms "
        f"(machine busy before: {imports.get('machine_busy_before', 0):.0%})",
        "third-party modules imported: " + ", ".join(imports["third_party_modules_imported"]),
        "heaviest imports (-X importtime, cumulative ms):",
    ]
    lines += [
        f"  {'  ' * item['depth']}{item['module']:<40} {item['cumulative_ms']:7.1f}"
        for item in imports["importtime_heaviest"]
    ]
    if "peers_minus_pass_ms" in imports:
        lines.append(
            "peer imports (ms over python -c pass, median of 5): "
            + ", ".join(f"{name} {ms:.0f}" for name, ms in imports["peers_minus_pass_ms"].items())
        )
    return "\n".join(lines)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
