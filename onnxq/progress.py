"""A small progress bar on stderr, standard library only.

``progress(iterable, total=120, desc="calibrate")`` yields the items of ``iterable`` and draws::

    calibrate  37/120 [=========>                    ]  3.1 it/s

redrawn in place (a carriage return before each state) at most ten times a second and finished with
a newline. By default it is shown only when stderr is a terminal and :func:`set_quiet` has not
silenced it (the CLI's ``--quiet``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress", "set_quiet"]

T = TypeVar("T")

BAR_WIDTH = 30
#: Minimum seconds between two redraws.
REDRAW_INTERVAL = 0.1

_quiet = False
_now = time.monotonic  # replaced in tests


def set_quiet(quiet: bool) -> None:
    """Silence progress bars whose ``enabled`` is left to the default (``None``)."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


def _stderr_is_tty() -> bool:
    stream = sys.stderr
    if stream is None:
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _format_rate(count: int, elapsed: float) -> str:
    if count == 0 or elapsed <= 0:
        return "? it/s"
    rate = count / elapsed
    if rate < 1:
        return f"{1 / rate:.1f} s/it"
    return f"{rate:.1f} it/s"


def format_line(desc: str, count: int, total: int | None, elapsed: float) -> str:
    """One state of the bar, without the leading carriage return."""
    rate = _format_rate(count, elapsed)
    if total is None or total <= 0:
        return f"{desc}  {count}  {rate}"
    filled = min(BAR_WIDTH, BAR_WIDTH * count // total)
    head = ">" if filled < BAR_WIDTH and count > 0 else ""
    bar = ("=" * filled + head).ljust(BAR_WIDTH)
    return f"{desc}  {count}/{total} [{bar}]  {rate}"


def progress(
    iterable: Iterable[T], *, total: int | None, desc: str, enabled: bool | None = None
) -> Iterator[T]:
    """Yield the items of ``iterable`` while drawing a progress bar on stderr.

    ``total`` is the expected number of items (``None``: unknown, then only a count is shown).
    ``enabled=None`` shows the bar when stderr is a terminal and :func:`set_quiet` is off;
    ``True``/``False`` force it on or off. The line is finished with a newline also when the
    iteration stops early or raises.
    """
    if enabled is None:
        enabled = not _quiet and _stderr_is_tty()
    if not enabled:
        yield from iterable
        return

    stream = sys.stderr
    start = _now()
    count = 0
    width = 0

    def draw() -> None:
        nonlocal width
        line = format_line(desc, count, total, _now() - start)
        padding = " " * max(0, width - len(line))  # erase what a longer previous line left behind
        width = len(line)
        try:
            stream.write("\r" + line + padding)
            stream.flush()
        except (OSError, ValueError):
            pass

    draw()
    last = _now()
    try:
        for item in iterable:
            yield item
            count += 1
            now = _now()
            if now - last >= REDRAW_INTERVAL:
                draw()
                last = now
    finally:
        draw()
        try:
            stream.write("\n")
            stream.flush()
        except (OSError, ValueError):
            pass
