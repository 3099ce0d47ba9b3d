"""The same logging loop with each real library and with its trackd drop-in.

    python benchmarks/dropin.py                      # every case, the default call counts
    python benchmarks/dropin.py --calls 20000 --repeat 3 --json benchmarks/results/dropin.json

Pairs: wandb offline vs `import trackd.wandb as wandb`; mlflow `log_metrics(...,
synchronous=False)` to a local `mlflow server` (sqlite, 127.0.0.1) vs `import trackd.mlflow
as mlflow`; trackio (local SQLite) vs `import trackd as trackio`; and trackd's own
`run.log` as the baseline a shim call is held to (at most 1 µs more). Each case runs in a
fresh subprocess (`--worker CASE`): it starts its run, warms up, then times every call of
the loop with `perf_counter_ns` (values built outside the timed region); the loop's time is
the sum, and the end of the run (finish / end_run / flush) is timed apart. The trackd cases
log through one daemon (default JSONL sink) in a temporary directory; every process this
script starts is ended by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from machine import provenance, wait_for_quiet

# case -> (what it measures, the real library it stands beside)
CASES: dict[str, tuple[str, str]] = {
    "wandb": ("wandb offline: run.log", "wandb"),
    "trackd.wandb": ("trackd.wandb: wandb.log", "wandb"),
    "mlflow": ("mlflow async to a local server: log_metrics", "mlflow"),
    "trackd.mlflow": ("trackd.mlflow: mlflow.log_metrics", "mlflow"),
    "trackio": ("trackio local: trackio.log", "trackio"),
    "trackd-as-trackio": ("import trackd as trackio: trackio.log", "trackio"),
    "trackd": ("trackd run.log (the baseline)", "trackd"),
}
TARGETS = {"wandb": 20.0, "mlflow": 50.0}  # the real loop over the shim loop, at least


def _loop(log: Callable[[dict[str, float], int], None], calls: int) -> list[int]:
    timer = time.perf_counter_ns
    times = [0] * calls
    for step in range(calls):
        values = {"loss": 1.0 / (step + 1), "acc": step / calls, "lr": 3e-4}
        began = timer()
        log(values, step)
        times[step] = timer() - began
    return times


def _setup(case: str, work: Path) -> tuple[Callable[[dict[str, float], int], None], Any]:
    """The case's log(values, step) and what ends its run."""
    if case == "wandb":
        import wandb

        run = wandb.init(project="bench", name="dropin", mode="offline", dir=str(work))
        return lambda values, step: run.log(values), run.finish
    if case == "trackd.wandb":
        import trackd.wandb as shim_wandb

        shim_run = shim_wandb.init(project="bench", name="dropin-wandb")
        return lambda values, step: shim_run.log(values), shim_run.finish
    if case in ("mlflow", "trackd.mlflow"):
        if case == "mlflow":
            import mlflow
        else:
            from trackd import mlflow  # type: ignore[no-redef]
        mlflow.set_experiment("bench")
        mlflow.start_run(run_name=f"dropin-{case}")
        log_metrics = mlflow.log_metrics

        def flush_and_end() -> None:
            if case == "mlflow":
                mlflow.flush_async_logging()
            mlflow.end_run()

        return lambda values, step: log_metrics(values, step=step, synchronous=False), flush_and_end
    if case in ("trackio", "trackd-as-trackio"):
        if case == "trackio":
            import trackio
        else:
            import trackd as trackio  # type: ignore[no-redef]
        trackio.init(project="bench", name=f"dropin-{case}")
        return lambda values, step: trackio.log(values), trackio.finish
    import trackd

    trackd_run = trackd.init(project="bench", name="dropin-trackd")
    return trackd_run.log, trackd_run.finish


def worker(case: str, calls: int, work: Path) -> dict[str, Any]:
    log, end = _setup(case, work)
    _loop(log, min(2_000, calls // 10))  # warm-up: imports, first frames, caches
    times = _loop(log, calls)
    began = time.perf_counter()
    end()
    ended = time.perf_counter() - began
    ordered = sorted(times)
    return {
        "case": case,
        "calls": calls,
        "loop_seconds": sum(times) / 1e9,
        "per_call_us_mean": sum(times) / calls / 1e3,
        "per_call_us_median": statistics.median(times) / 1e3,
        "per_call_us_p99": ordered[int(calls * 0.99)] / 1e3,
        "end_seconds": ended,
    }


class Services:
    """A trackd daemon and an mlflow server in a temporary directory, ended by PID."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.env = {
            **os.environ,
            "TRACKD_RUNTIME_DIR": str(work / "rt"),
            "TRACKD_DATA_DIR": str(work / "data"),
            "TRACKIO_DIR": str(work / "trackio"),
            "WANDB_MODE": "offline",
            "WANDB_DIR": str(work),
            "WANDB_SILENT": "true",
        }
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, with_mlflow: bool) -> None:
        log = (self.work / "services.log").open("ab")
        daemon = [sys.executable, "-m", "trackd", "serve"]
        self.processes.append(subprocess.Popen(daemon, env=self.env, stdout=log, stderr=log))
        self._wait((self.work / "rt" / "control.sock").exists)
        if with_mlflow:
            server, uri = start_mlflow_server(self.work, self.env, log)
            self.processes.append(server)
            self.env["MLFLOW_TRACKING_URI"] = uri

    @staticmethod
    def _wait(condition: Callable[[], bool], seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit("a service did not start; see services.log")
            time.sleep(0.2)

    def stop(self) -> None:
        for process in self.processes:
            stop_service(process)


def start_mlflow_server(
    work: Path, env: dict[str, str], log: IO[bytes]
) -> tuple[subprocess.Popen[bytes], str]:
    """`mlflow server` (sqlite, one worker) on 127.0.0.1 in `work`, answering; its tracking URI.
    In a session of its own: `stop_service` ends it and its uvicorn worker together."""
    port = 5000 + os.getpid() % 1000
    server = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    server += ["--port", str(port), "--workers", "1"]
    server += ["--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}"]
    server += ["--artifacts-destination", str(work / "mlartifacts")]
    env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(server, env=env, stdout=log, stderr=log, start_new_session=True)
    Services._wait(lambda: _answers(f"http://127.0.0.1:{port}/health"), 180)
    return process, f"http://127.0.0.1:{port}"


def stop_service(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a service this script started (an mlflow server with its worker), wait for it."""
    if process.poll() is None:
        with_group = process.args[1:3] == ["-m", "mlflow"]  # type: ignore[index]
        if with_group:  # its uvicorn worker is a child in the same session
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        process.wait(60)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # loopback only
            return bool(response.status == 200)
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--report", type=Path, help="print the table of a saved --json file")
    parser.add_argument("--worker")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.calls, args.work)))
        return
    if args.report:
        report(json.loads(args.report.read_text())["results"])
        return
    cases = args.cases.split(",")
    unknown = [case for case in cases if case not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases: {unknown}; known: {list(CASES)}")
    with tempfile.TemporaryDirectory(prefix="trackd-dropin-") as folder:
        services = Services(Path(folder))
        results: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
        try:
            services.start(with_mlflow="mlflow" in cases)
            for _ in range(args.repeat):
                for case in cases:
                    busy = wait_for_quiet(20)
                    done = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--worker",
                            case,
                            "--calls",
                            str(args.calls),
                            "--work",
                            folder,
                        ],
                        env=services.env,
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    if done.returncode != 0:
                        raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    result["cpu_busy_before"] = round(busy, 3)
                    results[case].append(result)
        finally:
            services.stop()
    if args.json:
        summary = {"provenance": provenance(sys.executable), "results": results}
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    report(results)


def report(results: dict[str, list[dict[str, Any]]]) -> None:
    """A table of medians over the repeats, and each pair's ratio against its target."""

    def median(case: str, field: str) -> float:
        return statistics.median(result[field] for result in results[case])

    print(f"{'case':<20}{'loop s':>9}{'mean µs':>10}{'p50 µs':>9}{'p99 µs':>9}{'end s':>8}")
    for case in results:
        print(
            f"{case:<20}{median(case, 'loop_seconds'):>9.3f}"
            f"{median(case, 'per_call_us_mean'):>10.2f}{median(case, 'per_call_us_median'):>9.2f}"
            f"{median(case, 'per_call_us_p99'):>9.2f}{median(case, 'end_seconds'):>8.2f}"
        )
    pairs = [
        ("wandb", "trackd.wandb"),
        ("mlflow", "trackd.mlflow"),
        ("trackio", "trackd-as-trackio"),
    ]
    for real, shim in pairs:
        if real in results and shim in results:
            ratio = median(real, "loop_seconds") / median(shim, "loop_seconds")
            whole = (median(real, "loop_seconds") + median(real, "end_seconds")) / (
                median(shim, "loop_seconds") + median(shim, "end_seconds")
            )
            target = TARGETS.get(real)
            verdict = ""
            if target is not None:
                verdict = f" (target >= {target:.0f}x: {'met' if ratio >= target else 'NOT met'})"
            ended = f"; with the run's end {whole:.0f}x"
            print(f"{real} loop / {shim} loop: {ratio:.1f}x{verdict}{ended}")
    if "trackd" in results:
        for shim in ("trackd.wandb", "trackd.mlflow", "trackd-as-trackio"):
            if shim in results:
                extra = median(shim, "per_call_us_median") - median("trackd", "per_call_us_median")
                verdict = "met" if extra <= 1.0 else "NOT met"
                print(f"{shim} call - trackd run.log call (p50): {extra:+.2f} µs ({verdict})")


if __name__ == "__main__":
    main()
