"""Turning what a user passes to `log()` into the protocol's flat {name: number} rows.

This runs in the caller's thread on every `log()`, so the common case (a flat
dict of floats and ints) is one loop with no allocation beyond the copy; the
rest (nesting, NumPy scalars, 0-d tensors) takes the slow path. Everything
the daemon would reject is refused here, with the key named, so that one bad
value can never cost the batch it would have travelled in.
"""

from __future__ import annotations

from collections.abc import Mapping

from trackd.client.media import Media

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `import trackd` ms
if TYPE_CHECKING:
    from typing import Any, Final

_INT64_MIN: Final = -(2**63)
_UINT64_END: Final = 2**64
if TYPE_CHECKING:
    Scalar = int | float | bool


class Pending:
    """A value on the GPU on its way to host memory, resolved by the delivery thread.

    Reading a CUDA tensor with `.item()` waits for every kernel queued before it: the
    training loop would stall on each `log()`. Instead the value is copied with
    `non_blocking=True` into pinned host memory behind a CUDA event, and the delivery
    thread waits on that event when it packs the row, long after the caller moved on.
    """

    __slots__ = ("_event", "_host", "_what")

    def __init__(self, tensor: Any, what: str) -> None:
        from importlib import import_module

        torch: Any = import_module("torch")  # the caller has it: only a torch tensor gets here

        if tensor.numel() != 1:
            raise ValueError(f"{what} must be a single number, got a tensor of {tensor.numel()}")
        self._host = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor.detach(), non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        self._what = what

    def resolve(self) -> Scalar:
        self._event.synchronize()
        return scalar(self._host.item(), self._what)


if TYPE_CHECKING:
    _Row = dict[str, Scalar | Pending]
else:
    _Row = dict


class WithMedia(Exception):  # not an error: the slow path's way out of log()
    """Raised by `metric_row` for a row holding media, so that `log()` pays nothing for media
    (a `try` costs nothing until it raises) and hands the row to its media path."""

    def __init__(self, row: dict[str, Scalar] | PendingRow, media: list[tuple[str, Media]]):
        super().__init__("a row with media")
        self.row = row
        self.media = media


class PendingRow(_Row):
    """A row holding at least one `Pending` value (so the delivery thread knows to resolve)."""

    def resolved(self) -> dict[str, Scalar]:
        return {k: v.resolve() if isinstance(v, Pending) else v for k, v in self.items()}


def metric_row(values: object, prefix: str = "") -> dict[str, Scalar] | PendingRow:
    """The row for `log(values)`, its keys prefixed with `prefix` (a rank's `rank{N}/`): the
    caller's own dict when it is flat and plain already (packed at once, never kept)."""
    if type(values) is dict and not prefix:
        for key, value in values.items():
            kind = type(value)
            if type(key) is not str or not (
                kind is float or kind is bool or (kind is int and _INT64_MIN <= value < _UINT64_END)
            ):
                break
        else:
            return values  # not copied: `log()` packs it before it returns
    if type(values) is not dict and not isinstance(values, Mapping):
        raise TypeError(
            f"log(): values must be a dict of name -> number, got {type(values).__name__}"
        )
    row: dict[str, Scalar | Pending] = {}
    media: list[tuple[str, Media]] = []
    pending = _flatten_metrics(values, prefix, row, media)
    plain: dict[str, Scalar] | PendingRow = PendingRow(row) if pending else row  # type: ignore[assignment]  # no Pending in it: all plain numbers
    if media:
        raise WithMedia(plain, media)
    return plain


def _flatten_metrics(
    values: Mapping[Any, Any],
    prefix: str,
    row: dict[str, Scalar | Pending],
    media: list[tuple[str, Media]],
) -> bool:
    """Add `values` to `row` and `media`; whether a value is on the GPU (`Pending`)."""
    pending = False
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"log(): key {key!r} must be a string, not {type(key).__name__}")
        name = prefix + key
        if type(value) is float:  # most values: before the ABC check of Mapping (~1 µs cold)
            row[name] = value
        elif isinstance(value, Mapping):
            pending = _flatten_metrics(value, name + "/", row, media) or pending
        elif isinstance(value, Media):
            media.append((name, value))
        elif getattr(value, "is_cuda", False) is True:
            row[name] = Pending(value, f"log(): {name!r}")
            pending = True
        else:
            row[name] = scalar(value, f"log(): {name!r}")
    return pending


def scalar(value: object, what: str) -> Scalar:
    """A Python number from an int, float, bool, NumPy scalar or 0-d tensor."""
    if isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        if not _INT64_MIN <= value < _UINT64_END:
            return float(value)
        return int(value)
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, str | bytes):
        try:
            plain = item()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{what} must be a single number: {exc}") from exc
        if isinstance(plain, bool | int | float):
            return scalar(plain, what)
    raise TypeError(f"{what} must be a number, got {type(value).__name__}")


def json_tree(value: object, what: str) -> Any:
    """Config and summary values: JSON-like data with string keys; NumPy scalars become numbers."""
    if value is None or isinstance(value, str | bool | int | float):
        return scalar(value, what) if isinstance(value, int | float) else value
    if isinstance(value, Mapping):
        tree = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{what}: key {key!r} must be a string, not {type(key).__name__}")
            tree[key] = json_tree(item, f"{what}[{key!r}]")
        return tree
    if isinstance(value, list | tuple):
        return [json_tree(item, f"{what}[{index}]") for index, item in enumerate(value)]
    if callable(getattr(value, "item", None)):
        return scalar(value, what)
    raise TypeError(
        f"{what} must be JSON-like (str, number, bool, None, list, dict), "
        f"got {type(value).__name__}"
    )


def string_map(values: object, what: str) -> dict[str, str]:
    """Tags: a mapping of name -> string, or a list of names (W&B style, each mapped to "")."""
    if isinstance(values, Mapping):
        tags = {}
        for key, value in values.items():
            if not isinstance(key, str):
                raise TypeError(f"{what}: key {key!r} must be a string")
            tags[key] = value if isinstance(value, str) else str(value)
        return tags
    if isinstance(values, list | tuple | set | frozenset):
        for tag in values:
            if not isinstance(tag, str):
                raise TypeError(f"{what}: tag {tag!r} must be a string")
        return dict.fromkeys(values, "")
    raise TypeError(f"{what} must be a dict or a list of strings, got {type(values).__name__}")
