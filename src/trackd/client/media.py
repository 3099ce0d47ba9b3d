"""Media for `log()`: `Image`, `Table`, `Video` and `Histogram`, in trackio's shapes.

Each object checks its input when constructed (so a bad array fails at once, in the
caller's line) and encodes it: a video to an animated GIF (Pillow writes it without
ffmpeg; a `.mp4` or `.gif` file is taken as it is), a table to JSON `{"columns": [...],
"data": [[...], ...]}`. An image keeps a copy of its pixels, and its PNG is written when
`data` is first read: by the delivery thread as it stores the image, so a training loop's
`log()` pays for a copy, not for compression (zlib and Pillow let go of the GIL while they
compress). NumPy, Pillow and pandas are imported here only when an object is built, and an
image from an array never imports Pillow: zlib writes its PNG (`_png_array`), since
Pillow's import (~90 ms) would otherwise stall the training loop at its first image.
The bytes go to the content-addressed store under DATA_DIR/artifacts (stored by the
delivery thread: see `transport.MediaMessage`), and a `media` message names the file:
bytes never travel in frames. A `Histogram` is the exception: its counts and edges are a
few hundred numbers and travel inline in the `media` body (`inline` is true).
"""

from __future__ import annotations

# math, operator and functools are loaded by `import trackd` already, and an import inside a
# function cost a histogram made after a torch step ~5 µs
import math
import operator
import os
from functools import partial

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `import trackd` ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class Media:
    """What every media object carries to `log()`."""

    kind: str = ""
    format: str = ""
    data: bytes = b""
    source: str | None = None  # a file taken as it is (stored by path, not re-encoded)
    caption: str | None = None
    inline: bool = False  # the data travels in the media body itself (meta()), not as a file

    def meta(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"<trackd.{type(self).__name__} {self.format} caption={self.caption!r}>"


def _caption(caption: object, what: str) -> str | None:
    if caption is not None and not isinstance(caption, str):
        raise TypeError(f"{what}: caption must be a string or None, got {type(caption).__name__}")
    return caption


def _png(pil_image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    pil_image.save(buffer, format="PNG")
    return buffer.getvalue()


_PNG_COLOR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grey, RGB, RGBA


def _png_array(pixels: Any) -> bytes:
    """An 8-bit PNG of (h, w), (h, w, 3) or (h, w, 4) uint8 pixels, from zlib alone.

    Every scanline takes the "Up" filter (the difference from the row above: one NumPy
    subtraction), which compresses smooth images about as well as Pillow's per-row choice.
    """
    import struct
    import zlib

    import numpy as np

    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = pixels.reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # the "Up" filter; the first row's "above" is zeros
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8: wraps modulo 256

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPES[channels], 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", header),
            chunk(b"IDAT", zlib.compress(filtered.tobytes(), 6)),
            chunk(b"IEND", b""),
        )
    )


class Image(Media):
    """An image from a file path, a NumPy array ((h, w), (h, w, c) or (c, h, w)) or a PIL image."""

    kind = "image"
    format = "png"
    # An array's PNG by Pillow rather than by `_png_array`: the same pixels, other bytes
    # (Pillow picks a filter per row). The W&B shim sets it: W&B writes with Pillow, and a
    # run's files and their sha256 in its history must be W&B's, byte for byte.
    pillow_png = False

    def __init__(self, value: Any, caption: str | None = None) -> None:
        self.caption = _caption(caption, "Image()")
        self._written: bytes | None = None  # the PNG, once `data` wrote it
        pixels = None
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            pixels = _hwc_uint8(value, "Image()").copy()  # the caller may change its array
            if not self.pillow_png:
                self.height, self.width = pixels.shape[:2]
                self._write: Callable[[], bytes] = partial(_png_array, pixels)
                return
        from PIL import Image as PILImage

        if pixels is not None:
            picture = PILImage.fromarray(pixels)
        elif isinstance(value, str | os.PathLike):
            path = os.fspath(value)
            if not os.path.isfile(path):
                raise ValueError(f"Image(): {path!r} is not a file")
            with PILImage.open(path) as opened:
                opened.load()
                picture = (
                    opened.convert("RGBA")
                    if opened.mode not in ("RGB", "RGBA", "L")
                    else opened.copy()
                )
        elif isinstance(value, PILImage.Image):
            picture = value.copy()
        else:
            raise TypeError(
                f"Image(): value must be a path, a NumPy array or a PIL image, "
                f"got {type(value).__name__}"
            )
        self.width, self.height = picture.size
        self._write = partial(_png, picture)

    @property
    def data(self) -> bytes:  # type: ignore[override]  # Media's attribute, written when read
        """The PNG. Two threads reading it first at once each write the same bytes."""
        png = self._written
        if png is None:
            png = self._written = self._write()
        return png

    def meta(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height}


def _hwc_uint8(array: Any, what: str) -> Any:
    """(h, w) or (h, w, c) uint8 from (h, w), (h, w, c) or (c, h, w); floats in [0, 1] scaled."""
    import numpy as np

    data = np.asarray(array)
    if data.ndim == 3 and data.shape[0] in (1, 3, 4) and data.shape[-1] not in (1, 3, 4):
        data = np.transpose(data, (1, 2, 0))
    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[-1] not in (3, 4)):
        raise ValueError(f"{what}: expected (h, w), (h, w, c) or (c, h, w), got {data.shape}")
    if data.dtype != np.uint8:
        if data.dtype.kind == "f":
            data = np.clip(data * 255.0, 0, 255)
        data = np.clip(data, 0, 255).astype(np.uint8)
    return data


class Video(Media):
    """A video from uint8 frames (frames, channels, h, w), a batch (batch, frames, channels,
    h, w) tiled into a grid, or a `.gif` / `.mp4` file."""

    kind = "video"

    def __init__(self, value: Any, caption: str | None = None, fps: float | None = None) -> None:
        self.caption = _caption(caption, "Video()")
        if fps is not None and (
            isinstance(fps, bool) or not isinstance(fps, int | float) or fps <= 0
        ):
            raise ValueError(f"Video(): fps must be a positive number, got {fps!r}")
        self.fps = float(fps) if fps is not None else None
        self.frames: int | None = None
        self.width: int | None = None
        self.height: int | None = None
        if isinstance(value, str | os.PathLike):
            path = os.fspath(value)
            extension = os.path.splitext(path)[1].lower().lstrip(".")
            if extension not in ("gif", "mp4"):
                raise ValueError(f"Video(): {path!r}: expected a .gif or .mp4 file")
            if not os.path.isfile(path):
                raise ValueError(f"Video(): {path!r} is not a file")
            self.format, self.source = extension, os.path.abspath(path)
            return
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise TypeError(
                f"Video(): expected a path or a NumPy array, got {type(value).__name__}"
            )
        self.format = "gif"
        self.data = self._gif(value)

    def _gif(self, value: Any) -> bytes:
        import io

        import numpy as np
        from PIL import Image as PILImage

        frames = np.asarray(value)
        if frames.dtype != np.uint8:
            raise ValueError(f"Video(): frames must be uint8 RGB in [0, 255], got {frames.dtype}")
        if frames.ndim == 5:
            frames = _tile(frames)
        if frames.ndim != 4 or frames.shape[1] not in (1, 3, 4):
            raise ValueError(
                "Video(): expected (frames, channels, h, w) or (batch, frames, channels, h, w),"
                f" got {frames.shape}"
            )
        frames = np.transpose(frames, (0, 2, 3, 1))
        if frames.shape[-1] == 1:
            frames = np.repeat(frames, 3, axis=-1)
        pictures = [PILImage.fromarray(frame[..., :3]) for frame in frames]
        self.frames, self.height, self.width = len(pictures), frames.shape[1], frames.shape[2]
        buffer = io.BytesIO()
        duration = round(1000.0 / (self.fps or 4.0))
        pictures[0].save(
            buffer,
            format="GIF",
            save_all=True,
            append_images=pictures[1:],
            duration=duration,
            loop=0,
        )
        return buffer.getvalue()

    def meta(self) -> dict[str, Any]:
        meta = {"frames": self.frames, "width": self.width, "height": self.height, "fps": self.fps}
        return {key: value for key, value in meta.items() if value is not None}


def _tile(batch: Any) -> Any:
    """(batch, frames, c, h, w) -> (frames, c, rows*h, cols*w): a grid as near square as fits."""
    import numpy as np

    count, frames, channels, height, width = batch.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    grid = np.zeros((frames, channels, rows * height, cols * width), dtype=batch.dtype)
    for index in range(count):
        row, col = divmod(index, cols)
        grid[:, :, row * height : (row + 1) * height, col * width : (col + 1) * width] = batch[
            index
        ]
    return grid


class Table(Media):
    """A table from a pandas DataFrame (`dataframe=`) or from `data=` rows and `columns=`."""

    kind = "table"
    format = "json"

    def __init__(
        self,
        columns: list[str] | None = None,
        data: list[list[Any]] | None = None,
        dataframe: Any = None,
        caption: str | None = None,
    ) -> None:
        import json

        self.caption = _caption(caption, "Table()")
        if dataframe is not None:
            if columns is not None or data is not None:
                raise ValueError("Table(): pass dataframe= or columns=/data=, not both")
            if not hasattr(dataframe, "to_json"):
                raise TypeError(
                    f"Table(): dataframe must be a pandas DataFrame, got {type(dataframe).__name__}"
                )
            parsed = json.loads(dataframe.to_json(orient="split", index=False))
            columns, data = [str(c) for c in parsed["columns"]], parsed["data"]
        if data is None:
            raise ValueError("Table(): pass dataframe= or data=")
        rows = [list(row) for row in data]
        if columns is None:
            columns = [f"col{index}" for index in range(len(rows[0]) if rows else 0)]
        for index, row in enumerate(rows):
            if len(row) != len(columns):
                raise ValueError(
                    f"Table(): row {index} has {len(row)} values for {len(columns)} columns"
                )
        self.columns = [str(column) for column in columns]
        self.rows = len(rows)
        try:
            self.data = json.dumps(
                {"columns": self.columns, "data": rows}, allow_nan=True, default=_cell
            ).encode()
        except ValueError as exc:
            raise ValueError(f"Table(): {exc}") from exc

    def meta(self) -> dict[str, Any]:
        return {"columns": self.columns, "rows": self.rows}


def _cell(value: Any) -> Any:
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    return str(value)


MAX_BINS = 512  # W&B's and trackio's cap


class Histogram(Media):
    """A histogram, in W&B's and trackio's forms: `Histogram(sequence, num_bins=64)` bins the
    finite values of a list, NumPy array or tensor; `Histogram(np_histogram=(counts, edges))`
    takes `numpy.histogram`'s result as it is. A plain list is binned without NumPy (as
    `numpy.histogram` would: equal-width bins over [min, max], the last bin closed)."""

    kind = "histogram"
    inline = True

    def __init__(
        self,
        sequence: Any = None,
        np_histogram: tuple[Any, Any] | None = None,
        num_bins: int = 64,
        caption: str | None = None,
    ) -> None:
        self.caption = _caption(caption, "Histogram()")
        if (sequence is None) == (np_histogram is None):
            raise ValueError("Histogram(): pass either sequence or np_histogram=(counts, edges)")
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"Histogram(): num_bins must be a positive int, got {num_bins!r}")
        bins = min(num_bins, MAX_BINS)
        if np_histogram is not None:
            self.counts, self.edges = _given_histogram(np_histogram)
        elif hasattr(sequence, "shape") and hasattr(sequence, "dtype"):
            self.counts, self.edges = _numpy_binned(sequence, bins)
        else:
            self.counts, self.edges = _binned(_finite_values(sequence), bins)

    def meta(self) -> dict[str, Any]:
        return {"counts": self.counts, "edges": self.edges}

    def __repr__(self) -> str:
        return f"<trackd.Histogram {len(self.counts)} bins caption={self.caption!r}>"


def _plain_list(value: Any, what: str) -> list[Any]:
    """A flat list of Python numbers from a list, tuple, NumPy array or tensor."""
    if hasattr(value, "detach"):  # a torch tensor, maybe on a GPU
        value = value.detach().cpu()
    if hasattr(value, "tolist") and hasattr(value, "shape"):
        # NumPy's own numbers: tolist() gives ints and floats only, so the check below, a
        # Python loop of ~0.3 µs a value in a training loop, would find nothing (a pandas
        # Series may hold pd.NA, so it is checked)
        numbers = type(value).__name__ == "ndarray" and value.dtype.kind in ("i", "u", "f")
        value = value.reshape(-1).tolist() if hasattr(value, "reshape") else value.tolist()
        if numbers:
            return value  # type: ignore[no-any-return]
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise TypeError(f"{what}: expected a sequence of numbers, got {type(value).__name__}")
    plain = []
    for index, item in enumerate(value):
        if type(item) is float or type(item) is int:
            plain.append(item)
            continue
        number = item.item() if callable(getattr(item, "item", None)) else item
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise TypeError(f"{what}[{index}]: expected a number, got {type(item).__name__}")
        plain.append(number)
    return plain


def _finite_values(sequence: Any) -> list[float]:
    return [float(v) for v in _plain_list(sequence, "Histogram(): sequence") if math.isfinite(v)]


def _binned(values: list[float], bins: int) -> tuple[list[int | float], list[float]]:
    if not values:
        return [], []
    low, high = min(values), max(values)
    if low == high:
        low, high = low - 0.5, high + 0.5
    width = (high - low) / bins
    edges = [low + index * width for index in range(bins)] + [high]
    counts: list[int | float] = [0] * bins
    last = bins - 1
    for value in values:
        index = int((value - low) / width)
        counts[index if index < last else last] += 1
    return counts, edges


def _numpy_binned(array: Any, bins: int) -> tuple[list[int | float], list[float]]:
    """A NumPy array or a tensor (whose owner has NumPy): `numpy.histogram` of its finite
    values, as trackio and W&B bin them, without a Python loop over millions of values."""
    import numpy as np

    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    values = np.asarray(array).reshape(-1)
    if values.dtype.kind not in "biuf":
        raise TypeError(f"Histogram(): sequence must hold numbers, got dtype {values.dtype}")
    values = values.astype(np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return [], []
    counts, edges = np.histogram(values, bins=bins)
    return counts.tolist(), edges.astype(float).tolist()


def _given_histogram(given: Any) -> tuple[list[int | float], list[float]]:
    if not isinstance(given, tuple | list) or len(given) != 2:
        raise TypeError("Histogram(): np_histogram must be a (counts, edges) pair")
    counts = _plain_list(given[0], "Histogram(): np_histogram counts")
    edges = list(map(float, _plain_list(given[1], "Histogram(): np_histogram edges")))
    if len(counts) > MAX_BINS:
        raise ValueError(f"Histogram(): np_histogram has {len(counts)} bins, at most {MAX_BINS}")
    if len(edges) != (len(counts) + 1 if counts else 0):
        raise ValueError(
            f"Histogram(): np_histogram needs one more edge than counts, "
            f"got {len(counts)} counts and {len(edges)} edges"
        )
    # map() rather than generators: the checks loop in C, as a histogram comes every few steps
    if not all(map(math.isfinite, counts + edges)) or (counts and min(counts) < 0):
        raise ValueError("Histogram(): np_histogram counts and edges must be finite, counts >= 0")
    if not all(map(operator.le, edges, edges[1:])):
        raise ValueError("Histogram(): np_histogram edges must not decrease")
    return counts, edges
