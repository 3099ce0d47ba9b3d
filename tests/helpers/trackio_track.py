"""The Track page of trackio's docs (../shared/reference/trackio-track.md) as one script.

`--impl real` runs it with trackio itself, `--impl trackd` with `import trackd as trackio`
(the one-line swap); `--phase main` is the page's run, `--phase resume` its "Resuming a
Run" section. Run in a scratch directory (it writes the page's image file there).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd  # type: ignore[import-untyped]
from PIL import Image as PILImage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["real", "trackd"], required=True)
    parser.add_argument("--phase", choices=["main", "resume"], required=True)
    args = parser.parse_args()
    if args.impl == "trackd":
        import trackd as trackio
    else:
        import trackio  # type: ignore[no-redef]

    if args.phase == "resume":
        trackio.init(project="my_project", name="my_first_run", resume="must")
        trackio.log({"loss": 0.01, "accuracy": 0.99})
        trackio.finish()
        return
    trackio.init(project="my_project", name="my_first_run", group="baseline", config={"lr": 0.01})
    trackio.log({"loss": 0.05})
    trackio.log({"loss": 0.04, "accuracy": 0.95})
    df = pd.DataFrame(
        {
            "prompt": ["Trackio", "Logging is"],
            "completion": ["is great!", "easy and fun!"],
            "reward": [0.123, 0.456],
        }
    )
    trackio.log({"loss": 0.03, "texts": trackio.Table(dataframe=df)})
    PILImage.new("RGB", (5, 4), (10, 20, 30)).save("image.png")
    trackio.log({"image": trackio.Image(value="image.png", caption="Image caption")})
    frames = np.random.RandomState(0).randint(0, 255, (10, 3, 64, 64), dtype=np.uint8)
    trackio.log({"my_video": trackio.Video(frames, caption="Random video", fps=30)})
    data = np.array([1.0, 2.0, 2.0, 3.0, 3.0, 3.0])
    trackio.log({"distribution": trackio.Histogram(data, num_bins=3)})
    trackio.alert("done", "all good")
    trackio.finish()


if __name__ == "__main__":
    main()
