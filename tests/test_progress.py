"""Tests for onnxq.progress: drawing on stderr, throttling, silence when disabled or quiet."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator

import pytest

from onnxq import progress as progress_mod
from onnxq.progress import format_line, progress, set_quiet


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    """A fake monotonic clock advanced by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _not_quiet() -> Iterator[None]:
    set_quiet(False)
    yield
    set_quiet(False)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(progress_mod, "_now", fake)
    return fake


def _lines(text: str) -> list[str]:
    """The states drawn, in order (each starts with a carriage return)."""
    return [part.rstrip() for part in text.split("\r") if part.strip()]


def test_enabled_draws_bar_and_newline(monkeypatch: pytest.MonkeyPatch, clock: _Clock) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    items = []
    for item in progress(range(4), total=4, desc="calibrate", enabled=True):
        items.append(item)
        clock.now += 0.5
    assert items == [0, 1, 2, 3]
    text = err.getvalue()
    assert text.startswith("\r") and text.endswith("\n")
    lines = _lines(text)
    assert lines[0] == "calibrate  0/4 [" + " " * 30 + "]  ? it/s"
    assert lines[-1] == "calibrate  4/4 [" + "=" * 30 + "]  2.0 it/s"
    assert any(line.startswith("calibrate  2/4 [" + "=" * 15 + ">") for line in lines)


def test_redraw_is_throttled(monkeypatch: pytest.MonkeyPatch, clock: _Clock) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    for _ in progress(range(1000), total=1000, desc="run", enabled=True):
        clock.now += 0.001  # 1 s in all: about ten redraws
    draws = err.getvalue().count("\r")
    assert 2 <= draws <= 13
    assert _lines(err.getvalue())[-1].startswith("run  1000/1000")


def test_unknown_total_and_slow_rate(monkeypatch: pytest.MonkeyPatch, clock: _Clock) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    for _ in progress(iter(range(2)), total=None, desc="eval", enabled=True):
        clock.now += 4.0
    assert _lines(err.getvalue())[-1] == "eval  2  4.0 s/it"


def test_shorter_line_erases_longer(monkeypatch: pytest.MonkeyPatch, clock: _Clock) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    clock.now = 0.0
    steps = iter([0.0625, 0.0625, 2.0])  # exact in binary: no rounding at the 0.1 s threshold
    for _ in progress(range(3), total=None, desc="x", enabled=True):
        clock.now += next(steps)
    parts = err.getvalue().split("\r")[1:]
    assert parts[0] == "x  0  ? it/s"
    assert parts[1] == "x  2  16.0 it/s"
    # The next state is one character shorter: a trailing space wipes the leftover character.
    assert parts[2] == "x  3  1.4 it/s "
    assert parts[3] == "x  3  1.4 it/s\n"  # already erased: no padding again


def test_newline_when_stopped_early_or_raising(monkeypatch: pytest.MonkeyPatch, clock: _Clock) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = progress(range(10), total=10, desc="a", enabled=True)
    for item in bar:
        if item == 2:
            break
    bar.close()  # type: ignore[attr-defined]
    assert err.getvalue().endswith("\n")

    err2 = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err2)

    def failing() -> Iterator[int]:
        yield 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(progress(failing(), total=3, desc="b", enabled=True))
    assert err2.getvalue().endswith("\n")


def test_disabled_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    err = _Tty()
    monkeypatch.setattr(sys, "stderr", err)
    assert list(progress(range(3), total=3, desc="x", enabled=False)) == [0, 1, 2]
    assert err.getvalue() == ""


def test_default_follows_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", plain)
    assert list(progress(range(3), total=3, desc="x")) == [0, 1, 2]
    assert plain.getvalue() == ""

    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert list(progress(range(3), total=3, desc="x")) == [0, 1, 2]
    assert "x  3/3" in tty.getvalue()


def test_quiet_silences_default_only(monkeypatch: pytest.MonkeyPatch) -> None:
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    set_quiet(True)
    assert progress_mod.is_quiet()
    assert list(progress(range(3), total=3, desc="x")) == [0, 1, 2]
    assert tty.getvalue() == ""
    # An explicit enabled=True still draws.
    list(progress(range(3), total=3, desc="x", enabled=True))
    assert "x  3/3" in tty.getvalue()
    set_quiet(False)
    assert not progress_mod.is_quiet()


def test_no_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", None)
    assert list(progress(range(2), total=2, desc="x")) == [0, 1]


def test_format_line() -> None:
    assert format_line("d", 0, 10, 0.0) == "d  0/10 [" + " " * 30 + "]  ? it/s"
    assert format_line("d", 5, 10, 2.0) == "d  5/10 [" + "=" * 15 + ">" + " " * 14 + "]  2.5 it/s"
    # More items than announced: the bar stays full.
    assert format_line("d", 12, 10, 1.0) == "d  12/10 [" + "=" * 30 + "]  12.0 it/s"
    assert format_line("d", 3, None, 1.0) == "d  3  3.0 it/s"
