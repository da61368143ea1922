"""Progress reporting for long operations (verify, convert, prune, ensemble, importers, generate, read_all):
the one home of the rule.

``progress=None`` (the default everywhere) means *auto*: a tqdm bar when standard error is a terminal, and
otherwise one plain line at most every :data:`LINE_INTERVAL_S` seconds (and a final line when one was
printed: a short operation prints nothing), so SLURM and CI
logs get readable progress instead of carriage-return floods. ``True`` forces a bar, ``False`` turns
reporting off.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

__all__ = ["Progress", "progress", "LINE_INTERVAL_S"]

LINE_INTERVAL_S = 30.0  # plain-line mode: at most one line per this many seconds


class Progress:
    """A counter that reports as a tqdm bar, as periodic plain lines, or not at all.

    Use as a context manager; :meth:`update` adds to the count; :meth:`__iter__` wraps an iterable (one
    update per item). ``mode`` is ``"bar"``, ``"lines"`` or ``"off"`` (chosen by :func:`progress`)."""

    def __init__(self, mode: str, *, total: int | None, desc: str, unit: str, stream: TextIO | None = None,
                 interval: float | None = None, **bar_options: Any):
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"progress mode must be 'bar', 'lines' or 'off'. Got {mode!r}.")
        self.mode, self.total, self.desc, self.unit = mode, total, desc, unit
        self.count = 0
        self._stream = stream
        self._interval = float(LINE_INTERVAL_S if interval is None else interval)  # None: the module's setting
        self._start = self._last = time.monotonic()
        self._lines = 0
        self._bar = tqdm(total=total, desc=desc, unit=unit, **bar_options) if mode == "bar" else None

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines":
            now = time.monotonic()
            if now - self._last >= self._interval:
                self._last = now
                self._lines += 1
                self._line()

    def set_postfix_str(self, text: str) -> None:
        """A suffix for the bar (shown at its next update; nothing in the other modes)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def _line(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self._start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        state = "done" if final else "running"
        stream = self._stream if self._stream is not None else sys.stderr
        print(f"{self.desc}: {self.count}{of} {self.unit} ({rate:.1f} {self.unit}/s, {elapsed:.0f} s, {state})",
              file=stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and self._lines:
            self._line(final=True)
            self.mode = "off"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wrap(self, iterable: Iterable) -> Iterator:
        """Iterate ``iterable``, counting one per item, and close at the end."""
        try:
            for item in iterable:
                yield item
                self.update()
        finally:
            self.close()


def _mode(enabled: bool | None, stream: TextIO | None) -> str:
    if enabled is False:
        return "off"
    if enabled is True:
        return "bar"
    if enabled is not None:
        raise TypeError(f"progress must be True, False or None (auto). Got {enabled!r}.")
    s = stream if stream is not None else sys.stderr
    isatty = getattr(s, "isatty", None)
    return "bar" if callable(isatty) and isatty() else "lines"


def progress(enabled: bool | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             stream: TextIO | None = None, **bar_options: Any) -> Progress:
    """A :class:`Progress` for a long operation: ``enabled`` None = auto (bar on a terminal, plain lines
    otherwise), True = bar, False = off. ``bar_options`` go to tqdm."""
    return Progress(_mode(enabled, stream), total=total, desc=desc, unit=unit, stream=stream, **bar_options)
