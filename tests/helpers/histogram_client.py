"""Log one run with histograms in every form, and alerts; print {"id": ...} as JSON.

Used by tests/test_histogram_sinks.py: a histogram from a plain list (binned without
NumPy), one from `np_histogram=` with uneven bins, one from a tensor, beside a metric;
then an alert at each level.
"""

from __future__ import annotations

import json

import numpy as np
import torch

import trackd

# [0, 1, 1, 2, 2, 2, 3, 3, 3, 3] in 4 bins over [0, 3]: counts 1, 2, 3, 4
VALUES = [0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
GIVEN = (np.array([5, 0, 7]), np.array([0.0, 1.0, 3.0, 10.0]))


def main() -> None:
    run = trackd.init(project="p", name="hist")
    run.log({"loss": 0.5, "h/list": trackd.Histogram(VALUES, num_bins=4)}, step=0)
    run.log({"loss": 0.4, "h/given": trackd.Histogram(np_histogram=GIVEN)}, step=1)
    run.log({"h/tensor": trackd.Histogram(torch.tensor(VALUES), num_bins=4)}, step=2)
    run.log({"loss": 0.3}, step=3)
    trackd.alert("loss is low", "below 0.35", level="INFO")
    trackd.alert("slow step", "", level="WARN")
    run.alert("diverged", "loss is nan", "error")
    run.finish()
    print(json.dumps({"id": run.id}))


if __name__ == "__main__":
    main()
