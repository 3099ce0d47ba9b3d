"""A run that uses every record type a sink maps: config (nested, then updated), tags,
summary, an artifact and a failed end. Prints a JSON result line like log_client.py."""

from __future__ import annotations

import argparse
import json
import tempfile

import trackd

ROWS = 50


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", default="vision")
    parser.add_argument("--name", required=True)
    args = parser.parse_args()

    run = trackd.init(
        project=args.project,
        name=args.name,
        config={"lr": 0.001, "optimizer": {"name": "adam", "betas": [0.9, 0.99]}},
        tags={"team": "cv"},
    )
    for step in range(ROWS):
        run.log({"loss": 1.0 / (step + 1), "step": step}, step=step)
    run.log_config({"epochs": 3})
    run.set_tags({"stage": "ablation"})
    run.set_summary({"best_loss": 0.02})
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as weights:
        weights.write(b"weights")
    run.log_artifact(weights.name, name="weights.bin")
    run.finish(status="failed")
    print(json.dumps({"id": run.id, "rows": ROWS}))


if __name__ == "__main__":
    main()
