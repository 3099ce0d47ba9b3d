"""Which worker of an MLflow server holds each connection, sampled beside a benchmark.

    python benchmarks/server_connections.py results/conns.jsonl &   # while sinks.py runs
    python benchmarks/server_connections.py --summary results/conns.jsonl

A kept-alive connection stays with the uvicorn worker that accepted it, so a
sink whose connections all fell to one of a server's two workers would leave
the other idle (benchmarks/README.md, issue 13 §2). Every `--interval` seconds
this writes, for each port an `mlflow server` (or its uvicorn workers) listens
on, the number of established connections each worker process holds, as one
JSON line. `--summary` prints how often each split was seen, per port (each of
`sinks.py`'s runs starts a server on a port of its own). It only reads the
machine's socket table, with psutil.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import psutil

SERVER_WORDS = ("mlflow", "uvicorn")


def _is_server(pid: int) -> bool:
    """An MLflow server or one of its workers (a worker's own command line is
    multiprocessing's, so its parent's is read too)."""
    try:
        process = psutil.Process(pid)
        parent = process.parent()
        words = " ".join(process.cmdline() + (parent.cmdline() if parent else []))
    except psutil.Error:
        return False
    return any(word in words for word in SERVER_WORDS)


def sample() -> dict[str, dict[str, int]]:
    connections = psutil.net_connections(kind="tcp")
    ports = {
        c.laddr.port
        for c in connections
        if c.status == psutil.CONN_LISTEN and c.pid and _is_server(c.pid)
    }
    held: dict[str, dict[str, int]] = {str(port): {} for port in ports}
    for c in connections:
        if c.status == psutil.CONN_ESTABLISHED and c.laddr.port in ports and c.pid:
            workers = held[str(c.laddr.port)]
            workers[str(c.pid)] = workers.get(str(c.pid), 0) + 1
    return held


def summary(path: Path, least: int) -> None:
    """Per port: the samples with at least `least` connections, by split (most per worker
    first)."""
    splits: dict[str, Counter[tuple[int, ...]]] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        for port, workers in json.loads(line)["servers"].items():
            if sum(workers.values()) >= least:
                splits[port][tuple(sorted(workers.values(), reverse=True))] += 1
    print(f"{'port':>6}  connections per worker: samples (at least {least} connections)")
    for port, seen in splits.items():
        print(f"{port:>6}  " + ", ".join(f"{split}: {n}" for split, n in seen.most_common()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="the JSON lines file to append to (or read)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--summary", action="store_true", help="print the splits of PATH")
    parser.add_argument("--least", type=int, default=3, help="--summary: fewer are left out")
    args = parser.parse_args()
    if args.summary:
        summary(args.path, args.least)
        return
    with args.path.open("a") as out:
        while True:
            held = sample()
            if held:
                out.write(json.dumps({"t": time.time(), "servers": held}) + "\n")
                out.flush()
            time.sleep(args.interval)


if __name__ == "__main__":
    main()
