"""A run that logs rows and, every `--every` rows, an artifact of its own content, until the
`--stop` file exists; prints {"id", "rows", "artifacts": {name: sha256}}. Each original is
deleted as soon as log_artifact returns, so only trackd's store holds it."""

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
    env: dict[str, str], name: str, stop: Path, every: int = 20, tick: float = 0.02
) -> subprocess.Popen[bytes]:
    """Run this script in its own process (for a test; conftest.finish_client reads it)."""
    pacing = ["--every", str(every), "--tick", str(tick)]
    return subprocess.Popen(
        [sys.executable, __file__, "--name", name, "--stop", str(stop), *pacing],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--stop", required=True)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--tick", type=float, default=0.02)
    args = parser.parse_args()

    run = trackd.init(project="p", name=args.name)
    artifacts: dict[str, str] = {}
    step = 0
    with tempfile.TemporaryDirectory() as scratch:
        while not os.path.exists(args.stop):
            run.log({"i": step}, step=step)
            if step % args.every == 0:
                content = f"{args.name} checkpoint at step {step}\n".encode() * 100
                original = Path(scratch) / "ckpt.bin"
                original.write_bytes(content)
                name = f"ckpt-{step}.bin"
                run.log_artifact(original, name=name)
                original.unlink()
                artifacts[name] = hashlib.sha256(content).hexdigest()
            step += 1
            time.sleep(args.tick)
    run.finish(timeout=60)
    print(json.dumps({"id": run.id, "rows": step, "artifacts": artifacts}))


if __name__ == "__main__":
    main()
