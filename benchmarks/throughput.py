"""End-to-end rows/s into the JSONL sink from 1 and from 4 client processes.

    python benchmarks/throughput.py                        # 1 and 4 clients, 250,000 rows each
    python benchmarks/throughput.py --clients 4 --rows 100000
    python benchmarks/throughput.py --profile benchmarks/results/profiles   # under py-spy

For each client count a fresh daemon (`python -m trackd serve`, default JSONL
sink) is started in a temporary directory. The clients start, import trackd
and open their run, then wait; on "go" each logs its rows (3 scalars, explicit
step) as fast as it can and calls `finish()`, which returns once the daemon has
acked everything (durable in its WAL). The clock stops when the daemon's
control `flush` reports every sink caught up; then the rows in every
metrics.jsonl are counted and must equal clients x rows. The daemon's CPU
seconds (utime + stime from /proc/PID/stat, over the measured interval) and
peak RSS (VmHWM from /proc/PID/status) are read before it is sent SIGTERM by
its PID.

With `--profile DIR`, the daemon and client 0 run under `py-spy record`
(py-spy as their parent: attaching by PID is not permitted in some containers),
raw collapsed stacks are written to DIR and the hottest functions are printed.
Profiled runs are slower; take the numbers from an unprofiled run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import proc_cpu_seconds, proc_status_kb, provenance, wait_for_quiet

HERE = Path(__file__).resolve()


# --- a client process --------------------------------------------------------------------------


def client(index: int, rows: int, timeout: float) -> None:
    import trackd

    run = trackd.init(project="throughput", name=f"client-{index}")
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    cpu, started = time.process_time(), time.perf_counter()
    log = run.log
    for step in range(rows):
        log({"loss": 1.0 / (step + 1), "acc": step * 1e-7, "lr": 3e-4}, step)
    logged = time.perf_counter()
    delivered = run.flush(timeout=timeout)  # True once the daemon acked every row (WAL-durable)
    flushed = time.perf_counter()
    run.finish(timeout=10)  # whatever is still unacked goes to the spool
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "index": index,
                "rows": rows,
                "log_seconds": logged - started,
                "flush_seconds": flushed - logged,
                "delivered": delivered,
                "finish_seconds": done - flushed,
                "cpu_seconds": time.process_time() - cpu,
            }
        ),
        flush=True,
    )


# --- the daemon ------------------------------------------------------------------------------


def _child_pid(parent: int, timeout: float = 10.0) -> int:
    """The first child process of `parent` (the program py-spy started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if int(fields[1]) == parent:
                        return int(entry.name)
        time.sleep(0.05)
    raise RuntimeError(f"no child of {parent} appeared")


def _py_spy(python: str) -> str:
    found = shutil.which("py-spy") or str(Path(python).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    return found


def _under_py_spy(python: str, output: Path, command: list[str]) -> list[str]:
    spy = [_py_spy(python), "record", "--format", "raw", "--rate", "250", "--threads"]
    return [*spy, "--nonblocking", "--output", str(output), "--", *command]


class Daemon:
    def __init__(
        self,
        python: str,
        root: Path,
        profile: Path | None,
        module: str,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.python = python
        self.runtime_dir = root / "rt"
        self.data_dir = root / "data"
        self.log_path = root / "daemon.log"
        command = [python, "-m", module, "serve", "--log-level", "WARNING"]
        command += ["--runtime-dir", str(self.runtime_dir), "--data-dir", str(self.data_dir)]
        if profile is not None:
            command = _under_py_spy(python, profile, command)
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(extra_env or {})},
            )
        self.pid = self.process.pid if profile is None else _child_pid(self.process.pid)
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

    def stop(self) -> float | None:
        """SIGTERM, then SIGKILL after 30 s; the seconds SIGTERM took, or None if it did not."""
        started = time.perf_counter()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.process.wait()
            return None
        return time.perf_counter() - started


# --- one measurement -----------------------------------------------------------------------------


def measure(clients: int, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"trackd-throughput-{clients}-"))
    profile_dir: Path | None = args.profile
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    profile = profile_dir / f"daemon-{clients}c.txt" if profile_dir else None
    daemon = Daemon(args.python, work, profile, args.serve_module)
    env = {**os.environ, **daemon.env()}
    env.pop("TRACKD_ENDPOINT", None)
    processes: list[subprocess.Popen[str]] = []
    result: dict[str, Any] = {"clients": clients, "rows_per_client": rows}
    total = result["rows_expected"] = clients * rows
    try:
        for index in range(clients):
            command = [args.python, str(HERE), "--client", str(index), "--rows", str(rows)]
            command += ["--timeout", str(args.timeout)]
            if profile_dir is not None and index == 0:
                command = _under_py_spy(
                    args.python, profile_dir / f"client-{clients}c.txt", command
                )
            processes.append(
                subprocess.Popen(
                    command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
            )
        for process in processes:
            assert process.stdout is not None
            for line in process.stdout:  # py-spy, when profiling, writes its own lines too
                if line.strip() == "ready":
                    break
            else:
                raise RuntimeError("a client failed to start")
        result["machine_busy_before"] = round(wait_for_quiet(args.quiet_wait), 3)
        result["daemon_rss_idle_mb"] = proc_status_kb(daemon.pid, "VmRSS") / 1024
        cpu_before = proc_cpu_seconds(daemon.pid)
        started = time.perf_counter()
        deadline = started + args.timeout
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        reports = []
        for process in processes:
            try:
                out, _ = process.communicate(timeout=max(1.0, deadline - time.perf_counter()))
                reports.append(json.loads(next(x for x in out.splitlines() if x[:1] == "{")))
            except subprocess.TimeoutExpired:
                result["error"] = f"clients not done after {args.timeout:.0f} s"
                break
        acked = time.perf_counter()
        caught_up = None
        if "error" not in result:
            remaining = max(1.0, deadline - time.perf_counter())
            caught_up = daemon.request("flush", wait=remaining, timeout=remaining + 10)
            if caught_up is None:
                result["error"] = "the daemon did not answer the control flush"
        ended = time.perf_counter()
        result["daemon_cpu_seconds"] = proc_cpu_seconds(daemon.pid) - cpu_before
        result["daemon_peak_rss_mb"] = proc_status_kb(daemon.pid, "VmHWM") / 1024
        status = daemon.request("status", timeout=5)
        result["rows_in_sink"] = sum(
            sum(1 for _ in path.open("rb"))
            for path in (daemon.data_dir / "runs").glob("*/*/metrics.jsonl")
        )
        result["spool_bytes_left"] = sum(
            path.stat().st_size for path in (daemon.data_dir / "spool").glob("*.spool")
        )
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
        result["daemon_sigterm_exit_seconds"] = daemon.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = ended - started
    result.update(
        sink_caught_up=caught_up,
        seconds=elapsed,
        rows_per_second=result["rows_in_sink"] / elapsed,
        acked_seconds=acked - started,
        clients_reports=reports,
        daemon_cpu_us_per_row=result["daemon_cpu_seconds"] / total * 1e6,
    )
    if reports and len(reports) == clients:
        result["acked_rows_per_second"] = (
            total / (acked - started) if all(r["delivered"] for r in reports) else None
        )
        result["client_log_seconds_max"] = max(r["log_seconds"] for r in reports)
        result["client_cpu_us_per_row"] = sum(r["cpu_seconds"] for r in reports) / total * 1e6
    if status is not None:
        (sink,) = status["sinks"].values()
        result["daemon_status"] = {
            "ingest_rows": status["ingest"]["rows"],
            "ingest_messages": status["ingest"]["messages"],
            "duplicates": status["ingest"]["duplicates"],
            "gaps": status["ingest"]["gaps"],
            "wal_bytes": status["wal"]["bytes"],
            "sink_delivered_rows": sink["delivered_rows"],
            "sink_retries": sink["retries"],
        }
    return result


# --- profiles -------------------------------------------------------------------------------------


def summarize_profile(path: Path, top: int = 12) -> str:
    """Per thread: the hottest functions (self and inclusive share) and lines, from py-spy raw."""
    names: dict[str, str] = {}
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    lines_: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        tid = "?"
        if frames[0].startswith("thread ("):
            head = frames.pop(0)
            tid, _, name = head[len("thread (") :].partition(")")
            if name.startswith(": "):
                names[tid] = name[2:]
        count = int(count_text)
        totals[tid] += count
        if frames:
            lines_[tid][frames[-1]] += count
            functions = [frame.rsplit(":", 1)[0] + ")" for frame in frames]
            own[tid][functions[-1]] += count
            for function in set(functions):
                inclusive[tid][function] += count
    out = [f"{path.name} (py-spy samples at 250 Hz):"]
    for tid, total in totals.most_common():
        out.append(f"  thread {names.get(tid, tid)}: {total} samples")
        out.append("    functions by self share (inclusive share):")
        for function, count in own[tid].most_common(top):
            share = inclusive[tid][function] / total
            out.append(f"      {count / total:6.1%} ({share:6.1%})  {function}")
        out.append("    lines by self share:")
        for frame, count in lines_[tid].most_common(top // 2):
            out.append(f"      {count / total:6.1%}  {frame}")
    return "\n".join(out)


def _cell(value: float | None, width: int, spec: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter with trackd")
    parser.add_argument("--clients", default="1,4", help="comma-separated client counts")
    parser.add_argument("--rows", type=int, default=250_000, help="rows per client")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="give up on a measurement after this long"
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=60.0, help="max seconds to wait for an idle machine"
    )
    parser.add_argument("--profile", type=Path, help="run under py-spy; write profiles here")
    parser.add_argument(
        "--serve-module",
        default="trackd",
        help="for experiments: run the daemon as `python -m MODULE serve ...` (a patched trackd)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument("--save", type=Path, help="write the results as JSON here")
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        client(args.client, args.rows, args.timeout)
        return
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        **provenance(args.python),
    }
    print(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}", flush=True)
    print(f"trackd {machine['commit']} from {machine['trackd_source']}")
    if machine["src_changes_not_committed"]:
        print(f"  uncommitted in src/: {machine['src_changes_not_committed']}")
    # SIGTERM: unwind, so that the daemon and clients started so far are ended by their PIDs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    results = []
    for clients in (int(text) for text in args.clients.split(",")):
        print(f"running {clients} client(s) x {args.rows:,} rows ...", flush=True)
        results.append(measure(clients, args.rows, args))
    print()
    head = (
        f"{'clients':>7} {'rows':>9} {'in sink':>9} {'rows/s e2e':>11} {'acked rows/s':>12} "
        f"{'seconds':>8} {'daemon CPU s':>12} {'daemon µs/row':>13} {'client µs/row':>13} "
        f"{'daemon peak RSS':>15}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['clients']:>7} {r['rows_expected']:>9,} {r['rows_in_sink']:>9,} "
            f"{r['rows_per_second']:>11,.0f} {_cell(r.get('acked_rows_per_second'), 12, ',.0f')} "
            f"{r['seconds']:>8.2f} {r['daemon_cpu_seconds']:>12.2f} "
            f"{r['daemon_cpu_us_per_row']:>13.2f} "
            f"{_cell(r.get('client_cpu_us_per_row'), 13, '.2f')} "
            f"{r['daemon_peak_rss_mb']:>12.1f} MB"
            + (f"  FAILED: {r['error']}" if "error" in r else "")
        )
    print(
        "(rows/s e2e: rows in metrics.jsonl / seconds until the daemon's flush reported its sink "
        "caught up; acked: until every client's flush() returned True, i.e. all rows durable in "
        "the WAL)"
    )
    for r in results:
        print(f"{r['clients']} client(s): daemon status {json.dumps(r.get('daemon_status'))}")
        print(f"  client spools left: {r['spool_bytes_left']:,} bytes; ", end="")
        print(f"daemon exit on SIGTERM: {r['daemon_sigterm_exit_seconds']} s; ", end="")
        print(f"machine busy before: {r['machine_busy_before']:.0%}")
    if args.profile:
        for path in sorted(args.profile.glob("*.txt")):
            summary = summarize_profile(path)
            print(summary)
            path.with_suffix(".summary").write_text(summary + "\n")
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        report = {"machine": machine, "rows_per_client": args.rows, "results": results}
        args.save.write_text(json.dumps(report, indent=2) + "\n")
        print(f"saved {args.save}")


if __name__ == "__main__":
    main()
