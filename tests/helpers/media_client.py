"""Log one run with every media kind beside scalars; print {"id": ...} as JSON.

Used by tests/test_media.py: Image from an ndarray, a PIL image and a PNG file, a Table from
a pandas DataFrame, a Video from (frames, channels, h, w) uint8 frames, and a batched Video.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
import pandas as pd  # type: ignore[import-untyped]
from PIL import Image as PILImage

import trackd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="media")
    args = parser.parse_args()
    run = trackd.init(project="p", name=args.name)
    gradient = np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)
    with tempfile.TemporaryDirectory() as scratch:
        png = os.path.join(scratch, "file.png")
        PILImage.new("RGB", (5, 4), (10, 20, 30)).save(png)
        run.log({"loss": 0.5, "img/array": trackd.Image(gradient, caption="gradient")}, step=0)
        run.log({"loss": 0.4, "img/pil": trackd.Image(PILImage.new("L", (3, 2), 7))}, step=1)
        run.log({"loss": 0.3, "img/file": trackd.Image(png, caption="from a file")}, step=2)
        os.remove(png)  # stored before log() returned
    frame = pd.DataFrame({"text": ["a", "b"], "score": [1.5, 2.0]})
    # frames that differ (a GIF merges identical neighbours)
    video = np.arange(4, dtype=np.uint8).repeat(3 * 8 * 10).reshape(4, 3, 8, 10) * 60
    batch = np.arange(2, dtype=np.uint8).repeat(3 * 4 * 4).reshape(1, 2, 3, 4, 4).repeat(3, 0) * 99
    run.log({"loss": 0.2, "preds": trackd.Table(dataframe=frame, caption="preds")}, step=3)
    run.log({"loss": 0.1, "clip": trackd.Video(video, fps=5, caption="clip")}, step=4)
    run.log({"loss": 0.0, "grid": trackd.Video(batch, fps=2)}, step=5)
    run.log({"loss": -0.1}, step=6)
    run.finish()
    print(json.dumps({"id": run.id}))


if __name__ == "__main__":
    main()
