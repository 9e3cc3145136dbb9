"""Progress bars that suit where stderr goes: a tqdm bar on a terminal, one summary line elsewhere.

A tqdm bar redraws itself with carriage returns; in a CI log or behind ``| tee`` that is a flood
of partial lines. :func:`progress_bar` gives the tqdm bar (``tqdm.auto``) when stderr is a
terminal (or a Jupyter kernel's stream, where ``tqdm.auto`` draws a widget), and otherwise a
:class:`LineProgress` with the same methods that writes exactly one line to stderr when it closes,
e.g. ``encode: 42 tensors in 1.3 s``. Disabled (``enabled=False``): nothing is written.
"""
from __future__ import annotations

import sys
import time

__all__ = ["progress_bar", "LineProgress"]


def _interactive(stream) -> bool:
    """Whether ``stream`` redraws a bar well: a terminal, or a Jupyter kernel's output stream."""
    if stream is None:
        return False
    if type(stream).__module__.split(".")[0] == "ipykernel":
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """A stand-in for a tqdm bar off a terminal: counts ``update`` calls and, when closed (by
    :meth:`close`, the end of its iteration or a ``with`` block), writes one line to stderr:
    ``"{desc}: {n} {unit}s in {seconds:.1f} s"`` (``n/total`` when it stopped short of ``total``;
    the postfix, if set, after a comma). ``quiet=True`` writes nothing."""

    def __init__(self, iterable=None, *, desc: str = "", total=None, unit: str = "it", quiet: bool = False):
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.desc, self.total, self.unit, self.quiet = desc, total, unit, quiet
        self.n = 0
        self.postfix = ""
        self.closed = False
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def line(self) -> str:
        """The summary line (without the newline)."""
        count = str(self.n) if self.total is None or self.n == self.total else f"{self.n}/{self.total}"
        unit = self.unit if self.n == 1 and count == "1" else f"{self.unit}s"
        head = f"{self.desc}: " if self.desc else ""
        tail = f", {self.postfix}" if self.postfix else ""
        return f"{head}{count} {unit} in {time.perf_counter() - self.start:.1f} s{tail}"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.quiet and sys.stderr is not None:
            print(self.line(), file=sys.stderr, flush=True)

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.n += 1
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(iterable=None, *, desc: str = "", total=None, unit: str = "it", enabled: bool = True,
                 leave: bool = True):
    """A progress bar over ``iterable`` (or ``total`` steps counted with ``update``).

    Enabled and stderr a terminal (or a Jupyter kernel's stream): ``tqdm.auto.tqdm(iterable,
    desc=desc, total=total, unit=unit, leave=leave)``, exactly the bar tqdm draws. Otherwise a
    :class:`LineProgress` (``update``, ``set_description``, ``set_postfix``, ``close``, iteration, a
    context manager) that writes one line to stderr when it closes if enabled, nothing if not.
    ``leave`` applies to the tqdm bar only (the line is the whole record off a terminal).
    """
    if enabled and _interactive(sys.stderr):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave)
    return LineProgress(iterable, desc=desc, total=total, unit=unit, quiet=not enabled)
