"""`map(progress=True)`: a progress bar, and task output printed above it.

Theory of operation
-------------------
`progress_bar(total)` picks the bar: `tqdm.auto` where tqdm is installed (a
widget in a notebook, a text bar in a terminal), else `TextBar`, a one-line
`\\r` bar with a rate and an ETA. Neither draws into something that is not
a terminal (a log file, a pipe): tqdm is made with `disable=None`, which
turns it off there, and `TextBar` is not made at all, so a redirected
stderr gets no bar (and no summary: a log gets what the program prints).

Bars are advanced in the caller's thread, while what tasks print arrives on
the link's thread; `write_output` clears every live bar, writes the text
and draws the bars again, under one lock, so a task's line never lands on
the bar's line.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO

REDRAW_EVERY = 0.1  # seconds between redraws of a TextBar

_lock = threading.Lock()
_live: list[Bar] = []  # the bars drawn now, which output must go above


class Bar(Protocol):
    def update(self, n: int) -> None: ...
    def clear(self) -> None: ...
    def refresh(self) -> None: ...
    def close(self) -> None: ...


class TextBar:
    """A one-line bar on stderr, a terminal: count, rate and ETA."""

    def __init__(
        self, total: int | None, stream: TextIO, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total, self.stream, self.clock = total, stream, clock
        self.done, self.began, self.drawn = 0, clock(), 0.0

    def update(self, n: int) -> None:
        self.done += n
        if self.clock() - self.drawn >= REDRAW_EVERY:
            self.refresh()

    def refresh(self) -> None:
        now = self.drawn = self.clock()
        rate = self.done / max(now - self.began, 1e-9)
        if self.total:
            width = 30
            filled = int(width * self.done / self.total)
            bar = "#" * filled + "-" * (width - filled)
            eta = f" eta {_clock((self.total - self.done) / rate)}" if rate > 0 else ""
            line = f"hived [{bar}] {self.done}/{self.total} {rate:,.0f}/s{eta}"
        else:
            line = f"hived {self.done} done {rate:,.0f}/s"
        self.stream.write(f"\r{line}\x1b[K")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        self.refresh()
        self.stream.write("\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """One map's bar, or nothing where no bar may be drawn."""

    def __init__(self, total: int | None) -> None:
        self.bar = progress_bar(total)
        if self.bar is not None:
            with _lock:
                _live.append(self.bar)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            with _lock:
                self.bar.update(n)

    def note(self, text: str) -> None:
        """A line of its own above the bar (the client is reconnecting, say)."""
        if self.bar is not None:
            write_output(sys.stderr, f"hived {text}\n")

    def close(self) -> None:
        bar, self.bar = self.bar, None
        if bar is not None:
            with _lock:
                _live.remove(bar)
                bar.close()


def progress_bar(total: int | None) -> Bar | None:
    """tqdm.auto's bar where tqdm is installed, else a TextBar on a terminal, else None."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        stderr = sys.stderr
        return TextBar(total, stderr) if stderr.isatty() else None
    # disable=None: off where stderr is no terminal (a notebook's widget stays on)
    bar: Any = tqdm(total=total, desc="hived", unit="task", disable=None, dynamic_ncols=True)
    return bar


def write_output(stream: TextIO, text: str) -> None:
    """What a task printed, written above any bar being drawn."""
    with _lock:
        for bar in _live:
            bar.clear()
        if _live and not text.endswith("\n"):
            text += "\n"  # else the bar, drawn from the line's start, would cover it
        stream.write(text)
        stream.flush()
        for bar in _live:
            bar.refresh()
