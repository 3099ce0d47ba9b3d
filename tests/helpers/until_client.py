"""A training script stand-in that logs until told to stop: `--per-tick` rows (keys i and
loss, consecutive steps) every `--tick` seconds, until the `--stop` file exists; then it
finishes the run and prints {"id", "rows"}. A test ends the run when it has done what it
wanted mid-run, however slow the machine is, instead of hoping a fixed count lasts.

With `--artifact-every N`, every Nth step also logs an artifact of its own content, its
original deleted as soon as log_artifact returns (so only trackd's store holds it), and
the output adds {"artifacts": {name: sha256}}. With `--console-every N` every Nth step
prints "line STEP" (captured by console="wrap"), with `--alert-every N` it sends an alert
titled "alert STEP"; the output adds {"lines": [...]} and {"alerts": [...]}."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trackd


def start(
    env: dict[str, str],
    name: str,
    stop: Path,
    per_tick: int = 10,
    tick: float = 0.05,
    artifact_every: int = 0,
    console_every: int = 0,
    alert_every: int = 0,
) -> subprocess.Popen[bytes]:
    """Run this script in its own process (for a test; conftest.finish_client reads it)."""
    pacing = ["--per-tick", str(per_tick), "--tick", str(tick)]
    pacing += ["--artifact-every", str(artifact_every)]
    pacing += ["--console-every", str(console_every), "--alert-every", str(alert_every)]
    return subprocess.Popen(
        [sys.executable, __file__, "--name", name, "--stop", str(stop), *pacing],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", default="p")
    parser.add_argument("--name", required=True)
    parser.add_argument("--stop", required=True)
    parser.add_argument("--per-tick", type=int, default=10)
    parser.add_argument("--tick", type=float, default=0.05)
    parser.add_argument("--artifact-every", type=int, default=0)
    parser.add_argument("--console-every", type=int, default=0)
    parser.add_argument("--alert-every", type=int, default=0)
    args = parser.parse_args()

    run = trackd.init(project=args.project, name=args.name, config={"until": args.stop})
    artifacts: dict[str, str] = {}
    lines: list[str] = []
    alerts: list[str] = []
    step = 0
    with tempfile.TemporaryDirectory() as scratch:
        while not os.path.exists(args.stop):
            for _ in range(args.per_tick):
                run.log({"i": step, "loss": 1.0 / (step + 1)}, step=step)
                if args.artifact_every and step % args.artifact_every == 0:
                    content = f"{args.name} checkpoint at step {step}\n".encode() * 100
                    original = Path(scratch) / "ckpt.bin"
                    original.write_bytes(content)
                    name = f"ckpt-{step}.bin"
                    run.log_artifact(original, name=name)
                    original.unlink()
                    artifacts[name] = hashlib.sha256(content).hexdigest()
                if args.console_every and step % args.console_every == 0:
                    lines.append(f"line {step}")
                    print(lines[-1], flush=True)
                if args.alert_every and step % args.alert_every == 0:
                    alerts.append(f"alert {step}")
                    trackd.alert(alerts[-1], f"at step {step}", level="WARN")
                step += 1
            time.sleep(args.tick)
    run.finish(timeout=60)
    result: dict[str, object] = {"id": run.id, "rows": step}
    if args.artifact_every:
        result["artifacts"] = artifacts
    if args.console_every:
        result["lines"] = lines
    if args.alert_every:
        result["alerts"] = alerts
    print(json.dumps(result))


if __name__ == "__main__":
    main()
