"""Console capture: tee the process's stdout and stderr into the run's `console` messages.

The training thread pays for the stream's own `write` plus a deque append. The
`write` attribute of the stream *object* (sys.stdout, sys.stderr as they are at
init) is replaced by a function that calls the write it found (the class's, or a
wrapper installed before: pytest's capture, another run's) and then appends the
text (stdout) or `("stderr", text)` to one deque, so the order of the two streams is
kept at the price of one small tuple for the rarer one. Text, return value and
exceptions of that write pass through unchanged, so the terminal shows exactly what
it would without trackd. Replacing the attribute instead of `sys.stdout` keeps the
object's identity, `fileno()`, `isatty()` and `buffer` as they were.

The delivery thread turns the pending writes into lines (`deliver`):

* split at "\\n"; a line with carriage returns keeps its last non-empty part (a
  tqdm bar's last frame, not every frame);
* a partial line is held until its newline, or until the run finishes;
* a line over `MAX_LINE_CHARS` is cut, with a marker that says how much;
* at most `MAX_PENDING_WRITES` writes wait for the delivery thread; past that they
  are dropped and a marker line counts them (memory stays bounded). The write that
  makes `WAKE_AT` wakes the thread: a flood that starts while it sleeps between a
  quiet run's polls (0.2 s) would fill the bound before it woke;
* a line's time is when the delivery thread took it (within 0.2 s of the write): a clock
  read per write would cost the training thread more than the rest of the tee.

Only the stream objects in place at init are wrapped: one installed later
(`contextlib.redirect_stdout` into a StringIO) is not the terminal, and its text
is not console output. On finish the wrapper is removed where it is still the
stream's `write`; where something wrapped it since, it stays in that chain as a
pass-through, so the later wrapper keeps working (STYLE.md: chain, never clobber).

After a fork the child drops the parent's pending writes and held partial lines
(the parent delivers those) and captures its own output through its own session.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from itertools import groupby

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `import trackd` ms
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any, TextIO

    Line = list[Any]  # [ts, stream, text]

STREAMS = ("stdout", "stderr")
MAX_LINE_CHARS = 16 * 1024
MAX_PENDING_WRITES = 1 << 18  # about 130,000 lines waiting: 200-250 ms of a flood
WAKE_AT = MAX_PENDING_WRITES // 8
# One `console` message: well under the protocol's 16 MiB frame cap even at the line cap.
MAX_LINES_PER_MESSAGE = 10_000
MAX_CHARS_PER_MESSAGE = 1 << 20
CUT_MARKER = " [trackd: {} characters cut]"
DROP_MARKER = "[trackd: {} console writes dropped: the delivery thread fell behind]"
_ABSENT = object()


class ConsoleCapture:
    """One run's tee of sys.stdout and sys.stderr."""

    def __init__(self, wake: Callable[[], None] | None = None) -> None:
        self._wake = wake  # the delivery thread's: a flood is filling the pending writes
        self._pending: deque[str | tuple[str, str]] = deque()
        self._dropped = 0
        self._active = True
        self._held = dict.fromkeys(STREAMS, "")  # partial lines, per stream
        self._cut = dict.fromkeys(STREAMS, 0)  # characters cut from the held line
        self._lock = threading.Lock()
        self._hooks: list[tuple[TextIO, object, Callable[[str], int]]] = []

    def install(self) -> None:
        for name in STREAMS:
            stream = getattr(sys, name, None)
            if stream is not None:
                self._wrap(stream, name)

    def _wrap(self, stream: TextIO, name: str) -> None:
        previous = stream.write
        instance = getattr(stream, "__dict__", None)
        own = instance.get("write", _ABSENT) if isinstance(instance, dict) else _ABSENT
        pending, append, capture = self._pending, self._pending.append, self

        if name == "stdout":

            def write(text: str) -> int:
                written = previous(text)
                if capture._active:
                    waiting = len(pending)
                    if waiting < MAX_PENDING_WRITES:
                        append(text)
                        if waiting == WAKE_AT:
                            capture.wake()
                    else:
                        capture._dropped += 1
                return written

        else:

            def write(text: str) -> int:
                written = previous(text)
                if capture._active:
                    waiting = len(pending)
                    if waiting < MAX_PENDING_WRITES:
                        append((name, text))
                        if waiting == WAKE_AT:
                            capture.wake()
                    else:
                        capture._dropped += 1
                return written

        try:
            stream.write = write  # type: ignore[method-assign]
        except (AttributeError, TypeError):  # a stream object that takes no attributes
            return
        self._hooks.append((stream, own, write))

    def wake(self) -> None:
        if self._wake is not None:
            self._wake()

    def uninstall(self) -> None:
        """Stop capturing; unhook where still outermost, else stay in the chain, passing through."""
        self._active = False
        for stream, own, write in self._hooks:
            instance = getattr(stream, "__dict__", None)
            if isinstance(instance, dict) and instance.get("write") is write:
                if own is _ABSENT:
                    del stream.write
                else:
                    stream.write = own  # type: ignore[assignment]
        self._hooks = []

    def after_fork(self) -> None:
        """In a forked child: what was pending belongs to the parent, which delivers it."""
        self._lock = threading.Lock()
        self._pending.clear()
        self._dropped = 0
        self._held = dict.fromkeys(STREAMS, "")
        self._cut = dict.fromkeys(STREAMS, 0)

    def deliver(self, send: Callable[[str, dict[str, Any]], None], final: bool = False) -> None:
        """Turn pending writes into lines and `send` them as `console` messages.

        Under the lock, so that messages are sent in the order their lines were written
        whichever thread (delivery thread, `flush()`, `finish()`) drains."""
        with self._lock:
            lines = self._lines(final)
            start, chars = 0, 0
            for index, line in enumerate(lines):
                chars += len(line[2])
                if index - start >= MAX_LINES_PER_MESSAGE or chars > MAX_CHARS_PER_MESSAGE:
                    send("console", {"lines": lines[start:index]})
                    start, chars = index, len(line[2])
            if start < len(lines):
                send("console", {"lines": lines[start:]})

    def _lines(self, final: bool) -> list[Line]:
        lines: list[Line] = []
        pending = self._pending
        popleft = pending.popleft
        items = [popleft() for _ in range(len(pending))]
        now = time.time()
        for kind, group in groupby(items, type):  # runs of stdout texts, of stderr tuples
            if kind is str:
                self._split("stdout", now, group, lines)  # type: ignore[arg-type]
            elif kind is tuple:
                texts = (item[1] for item in group if type(item[1]) is str)
                self._split("stderr", now, texts, lines)
        dropped = self._dropped
        if dropped:
            self._dropped -= dropped
            lines.append([time.time(), "stderr", DROP_MARKER.format(dropped)])
        if final:
            for name in STREAMS:
                if self._held[name] or self._cut[name]:
                    lines.append([time.time(), name, self._line(self._held[name], self._cut[name])])
                    self._held[name], self._cut[name] = "", 0
        return lines

    def _split(self, name: str, ts: float, texts: Iterable[str], lines: list[Line]) -> None:
        parts = (self._held[name] + "".join(texts)).split("\n")
        held = parts.pop()
        cut = self._cut[name]
        for part in parts:
            lines.append([ts, name, self._line(part, cut)])
            cut = 0
        if "\r" in held:  # keep the frame in progress, and the one before a trailing "\r"
            start = held.rstrip("\r").rfind("\r")
            if start > 0:
                held = held[start:]
        if len(held) > MAX_LINE_CHARS:
            cut += len(held) - MAX_LINE_CHARS
            held = held[:MAX_LINE_CHARS]
        self._held[name], self._cut[name] = held, cut

    @staticmethod
    def _line(text: str, cut: int) -> str:
        if "\r" in text:
            frames = [frame for frame in text.split("\r") if frame]
            text = frames[-1] if frames else ""
        if len(text) > MAX_LINE_CHARS:
            cut += len(text) - MAX_LINE_CHARS
            text = text[:MAX_LINE_CHARS]
        return text + CUT_MARKER.format(cut) if cut else text
