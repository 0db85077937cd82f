"""Progress reporting shared by every long command (ingest, train, score, bench).

On a terminal it draws a rich progress bar; when output is not a terminal (CI, ``nohup``, a log
file) it degrades to plain lines, at most one every ``interval`` seconds plus the final one, so
logs stay readable.

Library code takes an optional ``progress`` callback-like object and calls ``advance``; the CLI
decides how to show it. ``Progress.null()`` shows nothing (the library default).
"""

from __future__ import annotations

import bisect
import math
import sys
import time
from collections.abc import Sequence
from typing import IO


def recent_eta(marks: Sequence[tuple[float, float]], now: float, done: float,
               total: float) -> float | None:
    """Seconds until ``done`` reaches ``total`` at the recent rate, or None when it cannot be told.

    The rate is measured over the second half of the time elapsed since the first mark: the first
    items also pay for start-up (workers importing libraries, first reads), so the average since
    the start would overstate what is left, and a cluster that gained or lost workers is seen
    sooner. It is taken from the first mark of that half when the half holds two or more marks,
    else from the last mark before it (so one late item after a long start-up is not a rate).

    Parameters
    ----------
    marks : sequence of (time, done)
        Progress so far, oldest first; the first is where the measurement starts.
    now : float
        The current time, on the marks' clock.
    done, total : float
        Work done now and in all (items, or a fraction and 1.0).
    """
    if not marks:
        return None
    horizon = now - (now - marks[0][0]) / 2
    i = bisect.bisect_left(marks, (horizon, -math.inf))
    t0, d0 = marks[i] if len(marks) - i >= 2 else marks[max(0, i - 1)]
    if done <= d0 or now <= t0:
        return None
    return (now - t0) * (total - done) / (done - d0)


class Progress:
    """A counter towards ``total`` with a description, shown on ``stream``.

    Use as a context manager::

        with Progress("ingest", total=n_blocks, unit="blocks") as p:
            for ...:
                p.advance()
    """

    def __init__(
        self,
        description: str,
        total: int | None = None,
        *,
        unit: str = "",
        stream: IO[str] | None = None,
        interval: float = 5.0,
        enabled: bool = True,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.enabled = enabled
        self.completed = 0
        self._start = time.perf_counter()
        self._last_line = 0.0
        self._rich = None
        self._task = None
        self._depth = 0  # re-entrant: a library call may enter the Progress its caller entered
        self._marks: list[tuple[float, int]] = []  # (time, completed) at each advance
        self._base = 0
        self._note: str | None = None
        self._alert: str | None = None

    @classmethod
    def null(cls) -> "Progress":
        """A progress object that shows nothing."""
        return cls("", enabled=False)

    def __enter__(self) -> "Progress":
        self._depth += 1
        if self._depth > 1:
            return self
        self._start = time.perf_counter()
        if self.enabled and _is_terminal(self.stream):
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       ProgressColumn, TextColumn, TimeElapsedColumn)
            from rich.text import Text

            progress = self

            class EtaColumn(ProgressColumn):
                # This object's ETA (recent_eta), not rich's own estimate: the same number as
                # the plain lines and the dashboard page.
                def render(self, task):
                    eta = progress.eta()
                    return Text("-:--:--" if eta is None else
                                time.strftime("%H:%M:%S", time.gmtime(eta)))

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(self.unit), TimeElapsedColumn(), TextColumn("eta"),
                EtaColumn(), console=Console(file=self.stream), transient=False)
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        elif self.enabled and exc[0] is None:
            self._line(final=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def eta(self) -> float | None:
        """Seconds left at the recent rate (:func:`recent_eta`), or None when it cannot be told yet.

        Skipped (resumed) items never count towards the rate.
        """
        if not self.total or not self._marks:
            return None
        return recent_eta([(self._start, self._base), *self._marks], time.perf_counter(),
                          self.completed, self.total)

    def skip(self, n: int, *, note: str | None = None) -> None:
        """Count ``n`` items done before this run (resumed work): shown, but not in the rate."""
        self._base += n
        self.advance(n, note=note)
        self._marks.pop()

    def advance(self, n: int = 1, *, note: str | None = None) -> None:
        self.completed += n
        if n:
            self._marks.append((time.perf_counter(), self.completed))
        self._note = note
        self._show(self.completed == self.total)

    def alert(self, text: str | None, *, show: bool = False) -> None:
        """Say what the work is waiting on (a paused or silent worker), on every line until
        cleared with None; ``show`` prints a line now (else at the usual rate, even while
        nothing advances, so a stalled run keeps saying why)."""
        if text is None and self._alert is None:
            return
        self._alert = text
        self._show(show)

    def _show(self, now: bool) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            from rich.markup import escape

            desc = self.description if self._note is None else f"{self.description} ({self._note})"
            desc = escape(desc) + (f" [red]{escape(self._alert)}[/red]" if self._alert else "")
            self._rich.update(self._task, completed=self.completed, description=desc)
            return
        if now or time.perf_counter() - self._last_line >= self.interval:
            self._line(note=self._note)

    def _line(self, *, final: bool = False, note: str | None = None) -> None:
        self._last_line = time.perf_counter()
        of = f"/{self.total}" if self.total is not None else ""
        eta = self.eta()
        tail = "done" if final else (f"eta {eta:.0f} s" if eta is not None else "")
        extra = f" ({note})" if note else ""
        alert = f" -- {self._alert}" if self._alert and not final else ""
        print(f"{self.description}: {self.completed}{of} {self.unit} "
              f"[{self.elapsed:.1f} s{', ' + tail if tail else ''}]{extra}{alert}",
              file=self.stream, flush=True)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
