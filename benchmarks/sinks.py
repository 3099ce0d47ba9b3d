"""Into each backend through trackd versus through the backend's own client: loop and delivery.

    .venv/bin/python benchmarks/sinks.py                   # 100,000 steps x 3 metrics
    .venv/bin/python benchmarks/sinks.py --steps 5000 --only mlflow
    .venv/bin/python benchmarks/sinks.py --only mlflow --mlflow-default-steps 0 --repeat 3

For each backend (mlflow, wandb offline, aim, tensorboard, trackio, comet offline) and each way:

* trackd: a fresh daemon (`python -m trackd serve --sink SPEC`) in a temporary
  directory; a fresh client process calls `run.log({3 metrics}, step)` N times (the
  loop), then `finish()`, then the control `flush` (wait=600), which returns once every
  sink has delivered everything. "until in backend" is from the loop's start until
  flush returns.
* own client: a fresh process does the same through the backend's SDK: mlflow
  `log_metrics(..., synchronous=False)` (default settings, and with
  MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS=1, its fastest), wandb offline `log`, aim
  `Run.track` (one dict per step), tensorboardX `add_scalar` x3, trackio `log`, comet
  `OfflineExperiment.log_metrics` (with the auto-logging the sink turns off also off);
  "until in backend" ends when its own end call (`end_run`, `finish`, `close`, `end`:
  Comet's offline archive written) returns.

Every MLflow case gets its own fresh `mlflow server` (sqlite store, 127.0.0.1, started
and SIGKILLed by PID as in tests/mlflow_server.py). After every case the backend is
read back in a separate process (MlflowClient.get_metric_history, the .wandb
transaction log via tests/helpers/wandb_log.py, the aim SDK, TensorBoard's
EventAccumulator, trackio's SQLiteStorage, the messages of Comet's offline archives via
tests/helpers/comet_archive.py) and must hold every step of every metric;
a case that does not is reported as FAILED, not timed.

The machine is shared, so each case records the 1-minute load average before it,
and each MLflow case the CPU seconds its `mlflow server` (with its uvicorn worker)
used during the case: a server near one CPU-second per second is the limit, not
the client. `--repeat N` runs the whole plan N times, interleaved, to show the spread.

mlflow's default async logging drains at tens of steps/s (one HTTP call per step), so
that one case runs `--mlflow-default-steps` (default 5,000) steps; the table marks it
and its rates are measured on those steps, not extrapolated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
TESTS = HERE.parent.parent / "tests"
KEYS = ("loss", "acc", "i")
PROJECT = "sinksbench"


def values(step: int) -> dict[str, float]:
    return {"loss": 1.0 / (step + 1), "acc": step * 1e-6, "i": float(step)}


# --- the cases, each run in a fresh process (`--case NAME`) --------------------------------


def case_trackd(steps: int, work: Path) -> dict[str, Any]:
    import trackd
    from trackd.client.control import request

    run = trackd.init(project=PROJECT, name="trackd")
    log = run.log
    started = time.perf_counter()
    for step in range(steps):
        log(values(step), step)
    looped = time.perf_counter()
    run.finish(timeout=600)
    flushed = request("flush", runtime_dir=os.environ["TRACKD_RUNTIME_DIR"], wait=600, timeout=610)
    done = time.perf_counter()
    if not flushed:
        raise RuntimeError("flush did not report every sink caught up")
    return {"loop": looped - started, "delivered": done - started}


def case_mlflow(steps: int, work: Path) -> dict[str, Any]:
    import mlflow

    mlflow.set_tracking_uri(os.environ["BENCH_MLFLOW_URI"])
    mlflow.set_experiment(PROJECT)
    run = mlflow.start_run(run_name="own")
    log_metrics = mlflow.log_metrics
    started = time.perf_counter()
    for step in range(steps):
        log_metrics(values(step), step=step, synchronous=False)
    looped = time.perf_counter()
    mlflow.end_run()  # waits for the async queue to drain
    done = time.perf_counter()
    return {"loop": looped - started, "delivered": done - started, "run_id": run.info.run_id}


def case_wandb(steps: int, work: Path) -> dict[str, Any]:
    import wandb

    run = wandb.init(project=PROJECT, name="own", mode="offline", dir=str(work / "wandb"))
    log = run.log
    started = time.perf_counter()
    for step in range(steps):
        log(values(step), step=step)
    looped = time.perf_counter()
    run.finish()
    done = time.perf_counter()
    return {"loop": looped - started, "delivered": done - started}


def case_aim(steps: int, work: Path) -> dict[str, Any]:
    from aim import Run

    run = Run(repo=str(work / "aim"), experiment=PROJECT, system_tracking_interval=None)
    run.name = "own"
    track = run.track
    started = time.perf_counter()
    for step in range(steps):
        track(values(step), step=step)
    looped = time.perf_counter()
    run.close()
    done = time.perf_counter()
    return {"loop": looped - started, "delivered": done - started}


def case_tensorboard(steps: int, work: Path) -> dict[str, Any]:
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(work / "tb" / "own"))
    add_scalar = writer.add_scalar
    started = time.perf_counter()
    for step in range(steps):
        for key, value in values(step).items():
            add_scalar(key, value, step)
    looped = time.perf_counter()
    writer.close()
    done = time.perf_counter()
    return {"loop": looped - started, "delivered": done - started}


def case_trackio(steps: int, work: Path) -> dict[str, Any]:
    import trackio

    trackio.init(project=PROJECT, name="own")
    log = trackio.log
    started = time.perf_counter()
    for step in range(steps):
        log(values(step), step=step)
    looped = time.perf_counter()
    trackio.finish()
    done = time.perf_counter()
    return {"loop": looped - started, "delivered": done - started}


def case_comet(steps: int, work: Path) -> dict[str, Any]:
    import comet_ml

    from trackd.sinks.comet import QUIET

    experiment = comet_ml.OfflineExperiment(
        project_name=PROJECT, offline_directory=str(work / "comet"), **QUIET
    )
    experiment.set_name("own")
    log_metrics = experiment.log_metrics
    started = time.perf_counter()
    for step in range(steps):
        log_metrics(values(step), step=step)
    looped = time.perf_counter()
    experiment.end()
    done = time.perf_counter()
    return {"loop": looped - started, "delivered": done - started}


CASES = {
    "trackd": case_trackd,
    "mlflow": case_mlflow,
    "wandb": case_wandb,
    "aim": case_aim,
    "tensorboard": case_tensorboard,
    "trackio": case_trackio,
    "comet": case_comet,
}


# --- reading each backend back (`--verify BACKEND`), in a process of its own -----------------


def steps_in_backend(backend: str, work: Path) -> dict[str, list[int]]:
    """{metric: sorted steps} of the one run in the backend."""
    if backend == "mlflow":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=os.environ["BENCH_MLFLOW_URI"])
        experiment = client.get_experiment_by_name(PROJECT)
        (run,) = client.search_runs([experiment.experiment_id])
        return {
            key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            for key in KEYS
        }
    if backend == "wandb":
        sys.path.insert(0, str(TESTS))
        from helpers.wandb_log import read_runs

        (sessions,) = read_runs(work / "wandb" / "wandb").values()
        rows = [row for session in sessions for row in session.history]
        return {key: sorted(row["_step"] for row in rows if key in row) for key in KEYS}
    if backend == "aim":
        from aim import Repo, Run
        from aim.sdk.index_manager import RepoIndexManager

        repo = Repo(str(work / "aim"))
        (run_hash,) = list(repo.list_all_runs())
        RepoIndexManager.get_index_manager(repo).index(run_hash)
        run = Run(run_hash, repo=Repo(str(work / "aim")), read_only=True)
        found = {}
        for metric in run.metrics():
            metric_steps, _ = metric.data.view(["val"]).numpy()
            found[metric.name] = sorted(int(s) for s in metric_steps.tolist())
        return found
    if backend == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import (
            STORE_EVERYTHING_SIZE_GUIDANCE,
            EventAccumulator,
        )

        (directory,) = {path.parent for path in (work / "tb").rglob("events.out.tfevents.*")}
        events = EventAccumulator(str(directory), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
        events.Reload()
        return {key: sorted(point.step for point in events.Scalars(key)) for key in KEYS}
    if backend == "trackio":
        from trackio.sqlite_storage import SQLiteStorage

        (project,) = SQLiteStorage.get_projects()
        (name,) = SQLiteStorage.get_runs(project)
        logs = SQLiteStorage.get_logs(project, name)
        return {key: sorted(log["step"] for log in logs if key in log) for key in KEYS}
    if backend == "comet":
        sys.path.insert(0, str(TESTS))
        from helpers.comet_archive import metric_steps, read_archives

        (archives,) = read_archives(work / "comet").values()
        return {key: sorted(metric_steps(archives, key)) for key in KEYS}
    raise ValueError(backend)


def verify(backend: str, work: Path, steps: int, env: dict[str, str]) -> str | None:
    """None if the backend holds every step of every metric once, else what is wrong."""
    out = subprocess.run(
        [sys.executable, str(HERE), "--verify", backend, "--work", str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        return f"read-back failed: {out.stderr.strip().splitlines()[-1:]}"
    found: dict[str, list[int]] = json.loads(out.stdout.strip().splitlines()[-1])
    for key in KEYS:
        if found.get(key) != list(range(steps)):
            got = found.get(key) or []
            return f"{key}: {len(got)} points of {steps} ({len(set(got))} distinct steps)"
    return None


# --- processes started here, ended by PID ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(check: Any, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.args[:4]} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants (the server's uvicorn workers,
    PostgreSQL's backends), the children it has waited for included."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(field) for field in fields[11:15])  # utime stime cutime cstime
    children = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(FileNotFoundError):
        for child in children.read_text().split():
            total += round(cpu_seconds(int(child)) * os.sysconf("SC_CLK_TCK"))
    return total / os.sysconf("SC_CLK_TCK")


class MlflowServer:
    """`mlflow server`, 127.0.0.1, in its own process group (SIGKILLed by PID): an sqlite store
    with 1 worker, or ("postgres") a database of its own PostgreSQL cluster
    (tests/helpers/postgres.py) with 2 workers, the setup MLflow recommends for a shared
    server."""

    def __init__(self, root: Path, store: str = "sqlite") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.uri = f"http://127.0.0.1:{free_port()}"
        self.postgres: Any = None
        backend, workers = f"sqlite:///{root / 'mlflow.db'}", 1
        if store == "postgres":
            sys.path.insert(0, str(TESTS))
            from helpers.postgres import Postgres

            self.postgres = Postgres().start()
            backend, workers = self.postgres.create_database("mlflow"), 2
        port = self.uri.rsplit(":", 1)[1]
        log = root / "server.log"
        command = [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", port),
            *("--workers", str(workers), "--backend-store-uri", backend),
            *("--artifacts-destination", str(root / "artifacts")),
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_until(self._answers, self.process, log, 300)
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def cpu_seconds(self) -> float:
        """The server's CPU time, its database's (PostgreSQL's backends) included."""
        total = cpu_seconds(self.process.pid)
        if self.postgres is not None and self.postgres.process is not None:
            total += cpu_seconds(self.postgres.process.pid)
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the group of the PID started here
            self.process.wait(10)
        if self.postgres is not None:
            self.postgres.stop()


class Daemon:
    """`python -m trackd serve --sink SPEC` on its own runtime and data directories."""

    def __init__(self, root: Path, spec: str, env: dict[str, str]) -> None:
        self.runtime_dir = root / "rt"
        self.env = {
            **env,
            "TRACKD_RUNTIME_DIR": str(self.runtime_dir),
            "TRACKD_DATA_DIR": str(root / "data"),
        }
        self.env.pop("TRACKD_ENDPOINT", None)
        self.env.pop("TRACKD_SINKS", None)
        log = root / "daemon.log"
        command = [sys.executable, "-m", "trackd", "serve", "--log-level", "WARNING"]
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [*command, "--sink", spec], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        wait_until(self._answers, self.process, log, 30)

    def _answers(self) -> bool:
        """The daemon answers and its sink is open: delivery is timed from a sink ready to
        write, as the ceiling's senders are timed after their imports (the MLflow sink's
        open imports mlflow, 1.5-3 s of CPU here), a cost a running daemon paid once."""
        from trackd.client.control import DaemonUnreachable, request

        try:
            status = request("status", runtime_dir=str(self.runtime_dir), timeout=0.5)
        except DaemonUnreachable:
            return False
        return all(sink["open"] for sink in status["sinks"].values())

    def concurrency(self) -> dict[str, Any] | None:
        """The sink's concurrency limit as `trackd status` shows it (None: not a network sink)."""
        from trackd.client.control import request

        status = request("status", runtime_dir=str(self.runtime_dir), timeout=5)
        (sink,) = status["sinks"].values()
        return sink.get("concurrency")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# --- one measurement -------------------------------------------------------------------------


def backend_env(backend: str, work: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if backend == "wandb":
        (work / "wandb").mkdir(parents=True, exist_ok=True)
        env |= {
            "WANDB_MODE": "offline",  # never online
            "WANDB_DIR": str(work / "wandb"),
            "WANDB_CONFIG_DIR": str(work / "wandb-config"),
            "WANDB_CACHE_DIR": str(work / "wandb-cache"),
            "WANDB_DATA_DIR": str(work / "wandb-data"),
            "WANDB_SILENT": "true",
        }
    if backend == "trackio":
        env["TRACKIO_DIR"] = str(work / "trackio")
    if backend == "comet":  # offline, and nothing can reach Comet's servers
        env |= {
            "COMET_API_KEY": "",
            "COMET_CONFIG": str(work / "no-comet.config"),
            "COMET_URL_OVERRIDE": f"http://127.0.0.1:{free_port()}/clientlib/",
            "COMET_ERROR_TRACKING_ENABLE": "false",
        }
    return env


def spec_for(backend: str, work: Path, uri: str | None) -> str:
    return {
        "mlflow": f"mlflow:{uri}",
        "wandb": "wandb:*?mode=offline",
        "aim": f"aim:{work / 'aim'}",
        "tensorboard": f"tensorboard:{work / 'tb'}",
        "trackio": f"trackio:{PROJECT}",
        "comet": f"comet:{PROJECT}?offline_directory={work / 'comet'}",
    }[backend]


def measure(
    backend: str,
    way: str,
    steps: int,
    extra: dict[str, str],
    store: str = "sqlite",
    options: str = "",
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"trackd-sinks-{backend}-"))
    env = backend_env(backend, work) | extra
    server = daemon = None
    result: dict[str, Any] = {"backend": backend, "way": way, "steps": steps}
    result["load_before"] = os.getloadavg()[0]
    try:
        if backend == "mlflow":
            server = MlflowServer(work / "mlflow", store)
            env["BENCH_MLFLOW_URI"] = server.uri
        case = backend
        if way == "trackd":
            spec = spec_for(backend, work, server and server.uri)
            daemon = Daemon(work, f"{spec}?{options}" if options else spec, env)
            env, case = daemon.env, "trackd"
        command = [sys.executable, str(HERE), "--case", case, "--steps", str(steps)]
        server_cpu = server.cpu_seconds() if server is not None else 0.0
        out = subprocess.run(
            [*command, "--work", str(work)],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if server is not None:
            result["server_cpu"] = server.cpu_seconds() - server_cpu
        if out.returncode != 0:
            result["error"] = out.stderr.strip()[-2000:]
            return result
        result |= json.loads(out.stdout.strip().splitlines()[-1])
        result["missing"] = verify(backend, work, steps, env)  # the daemon still running
        if daemon is not None:
            result["concurrency"] = daemon.concurrency()
    finally:
        if daemon is not None:
            daemon.stop()
        if server is not None:
            server.stop()
    return result


# --- the server's ceiling (`--ceiling STORE...`): raw log_batch calls, then trackd beside it --

STEPS_PER_CALL = 333  # x 3 keys: 999 metrics, a full log_batch (MLflow's cap is 1,000)


def raw_log_batch(
    uri: str, run_id: str, threads: int, seconds: float, first: int, fresh: bool
) -> int:
    """`threads` senders, each posting log_batch calls of 999 metrics (333 new steps x 3 keys)
    straight at the REST API, back to back, for `seconds`; the steps stored (a call in flight
    at the end is waited for and counted). Bodies are built as trackd builds them (json).
    `fresh`: each call on a new connection (`Connection: close`), which the server's workers
    take as they are free to; otherwise each sender keeps its connection, and with it the
    worker that accepted it (trackd's MLflow sink keeps MLflow's session, so this way)."""
    import itertools
    import threading

    import requests

    calls = itertools.count(first // STEPS_PER_CALL)
    lock = threading.Lock()
    stored: list[int] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def sender() -> None:
        session = requests.Session()
        while time.monotonic() < deadline and not errors:
            with lock:
                start = next(calls) * STEPS_PER_CALL
            millis = int(time.time() * 1000)
            metrics = [
                {"key": key, "value": value, "timestamp": millis, "step": step}
                for step in range(start, start + STEPS_PER_CALL)
                for key, value in values(step).items()
            ]
            response = session.post(
                f"{uri}/api/2.0/mlflow/runs/log-batch",
                data=json.dumps({"run_id": run_id, "metrics": metrics}),
                headers={"Content-Type": "application/json"}
                | ({"Connection": "close"} if fresh else {}),
                timeout=300,
            )
            with lock:
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:300]}")
                stored.append(STEPS_PER_CALL)
        session.close()

    workers = [threading.Thread(target=sender) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise RuntimeError(f"log_batch failed: {errors[0]}")
    return sum(stored)


def ceiling(store: str, seconds: float, most: int) -> dict[str, Any]:
    """The server's ceiling in steps/s: concurrency 1, 2, 4, ... until two steps in a row
    add less than 5% over the best so far (or `most` senders), each with kept-alive
    connections and with a new connection a call; the whole curve, the best of either."""
    from mlflow.tracking import MlflowClient

    work = Path(tempfile.mkdtemp(prefix=f"trackd-ceiling-{store}-"))
    server = MlflowServer(work / "mlflow", store)
    curve: list[dict[str, Any]] = []
    try:
        client = MlflowClient(tracking_uri=server.uri)
        run_id = client.create_run(client.create_experiment("ceiling")).info.run_id
        step, best, flat, threads = 0, 0.0, 0, 1
        while threads <= most and flat < 2:
            rates = []
            for fresh in (False, True):
                load, cpu = os.getloadavg()[0], server.cpu_seconds()
                began = time.perf_counter()
                steps = raw_log_batch(server.uri, run_id, threads, seconds, step, fresh)
                elapsed = time.perf_counter() - began
                step += steps + threads * STEPS_PER_CALL  # past any call counted or not
                rates.append(steps / elapsed)
                busy = (server.cpu_seconds() - cpu) / elapsed
                connections = "fresh" if fresh else "kept"
                curve.append(
                    {"threads": threads, "connections": connections, "rate": rates[-1]}
                    | {"load": load, "server_cpu": busy}
                )
                print(
                    f"  {store}: {threads:>3} at once, {connections:>5} connections:"
                    f" {rates[-1]:>8,.0f} steps/s (server {busy:.2f} CPU, load {load:.2f})",
                    flush=True,
                )
            flat = flat + 1 if max(rates) < best * 1.05 else 0
            best = max(best, *rates)
            threads *= 2
    finally:
        server.stop()
    return {"store": store, "curve": curve, "ceiling": max(p["rate"] for p in curve)}


def ceiling_plan(args: argparse.Namespace) -> None:
    """Each store: the ceiling, then trackd's delivery (`--repeat` fresh servers) as a
    fraction of it."""
    results = []
    for store in args.ceiling:
        found: dict[str, Any] = {"store": store, "curve": [], "ceiling": float("nan")}
        if not args.no_ceiling:
            calls = f"raw log_batch calls of {STEPS_PER_CALL * 3} metrics, {args.seconds} s each"
            print(f"{store}: {calls}")
            found = ceiling(store, args.seconds, args.most)
        found["trackd"] = []
        for _ in range(args.repeat):
            result = measure("mlflow", "trackd", args.steps, {}, store, args.sink_options)
            if "error" in result or result["missing"] is not None:
                raise RuntimeError(f"trackd into {store}: {result}")
            found["trackd"].append(result)
            print(
                f"  {store}: trackd {args.steps:,} steps: {rate(result):,.0f} steps/s ="
                f" {rate(result) / found['ceiling']:.0%} of the ceiling"
                f" (server {result['server_cpu'] / result['delivered']:.2f} CPU,"
                f" load {result['load_before']:.2f}; {limits(result['concurrency'])})",
                flush=True,
            )
        results.append(found)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def limits(concurrency: dict[str, Any] | None) -> str:
    if concurrency is None:
        return "one call at a time"
    moves = f"+{concurrency['increases']} -{concurrency['decreases']}"
    return f"{concurrency['mode']} limit {concurrency['limit']}/{concurrency['ceiling']}, {moves}"


def rate(result: dict[str, Any]) -> float:
    return float(result["steps"] / result["delivered"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument(
        "--mlflow-default-steps",
        type=int,
        default=5000,
        help="steps for mlflow's default async logging (it drains at tens of steps/s); 0: skip it",
    )
    parser.add_argument("--repeat", type=int, default=1, help="run the whole plan N times")
    parser.add_argument("--only", nargs="*", default=list(CASES)[1:], help="backends to run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--ceiling",
        nargs="+",
        choices=["sqlite", "postgres"],
        help="measure the MLflow server's ceiling on these stores, then trackd against it",
    )
    parser.add_argument("--seconds", type=float, default=20, help="--ceiling: per concurrency")
    parser.add_argument("--most", type=int, default=32, help="--ceiling: most senders at once")
    parser.add_argument("--sink-options", default="", help="--ceiling: e.g. in_flight=8")
    parser.add_argument("--no-ceiling", action="store_true", help="--ceiling: trackd only")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--verify", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(CASES[args.case](args.steps, args.work)), flush=True)
        return
    if args.verify:
        print(json.dumps(steps_in_backend(args.verify, args.work)), flush=True)
        return
    if args.ceiling:
        ceiling_plan(args)
        return

    plan: list[tuple[str, str, int, dict[str, str]]] = []
    for backend in args.only:
        plan.append((backend, "trackd", args.steps, {}))
        if backend == "mlflow":
            default_steps = min(args.steps, args.mlflow_default_steps)
            if default_steps:
                plan.append((backend, "own async (default)", default_steps, {}))
            fastest = {"MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "1"}
            plan.append((backend, "own async (buffer 1 s)", args.steps, fastest))
        else:
            plan.append((backend, "own client", args.steps, {}))

    print(f"{args.steps:,} steps x {len(KEYS)} metrics per case; each case in a fresh process")
    header = f"{'backend':<12}{'way':<24}{'steps':>8}{'loop s':>9}{'loop µs/step':>14}"
    header += f"{'s until in backend':>20}{'steps/s delivered':>19}{'load':>6}{'server CPU s':>14}"
    print(header + "  check")
    results = []
    for repeat in range(args.repeat):
        for backend, way, steps, extra in plan:
            result = measure(backend, way, steps, extra) | {"repeat": repeat}
            results.append(result)
            if "error" in result:
                print(f"{backend:<12}{way:<24}{steps:>8,}  ERROR: {result['error'][-600:]}")
                continue
            missing = result["missing"]
            check = "all steps present" if missing is None else f"FAILED {missing}"
            server_cpu = f"{result['server_cpu']:.1f}" if "server_cpu" in result else "-"
            print(
                f"{backend:<12}{way:<24}{steps:>8,}{result['loop']:>9.2f}"
                f"{result['loop'] / steps * 1e6:>14.1f}{result['delivered']:>20.2f}"
                f"{rate(result):>19,.0f}{result['load_before']:>6.2f}{server_cpu:>14}  {check}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    for repeat in range(args.repeat):
        print(f"\nratios (targets from issue 3){f', run {repeat + 1}' if args.repeat > 1 else ''}")
        ratios([result for result in results if result["repeat"] == repeat], args)


def ratios(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    def find(backend: str, way: str) -> dict[str, Any] | None:
        for result in results:
            ok = "error" not in result and result.get("missing") is None
            if ok and result["backend"] == backend and result["way"] == way:
                return result
        return None

    trackd_ml = find("mlflow", "trackd")
    for backend, way in (
        ("mlflow", "own async (default)"),
        ("mlflow", "own async (buffer 1 s)"),
        ("wandb", "own client"),
    ):
        own, through = find(backend, way), find(backend, "trackd")
        if own and through:
            ratio = (own["loop"] / own["steps"]) / (through["loop"] / through["steps"])
            verdict = "met" if ratio >= 50 else "NOT met"
            print(f"  loop per step, {backend} {way} / trackd: {ratio:,.1f}x (>= 50x: {verdict})")
    fastest = find("mlflow", "own async (buffer 1 s)")
    if trackd_ml and fastest:
        ratio = rate(trackd_ml) / rate(fastest)
        verdict = "met" if ratio >= 2 else "NOT met"
        print(
            f"  delivery into MLflow, trackd / mlflow fastest async: {ratio:.2f}x"
            f" (>= 2x: {verdict})"
        )
    if args.steps > args.mlflow_default_steps > 0:
        print(
            f"  mlflow default async ran {min(args.steps, args.mlflow_default_steps):,} steps "
            "(it drains at tens of steps/s); its figures are measured rates on those steps"
        )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
