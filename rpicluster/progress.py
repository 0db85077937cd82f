"""Progress reporting shared by every long command (ingest, train, score, bench).

On a terminal it draws a rich progress bar; when output is not a terminal (CI, ``nohup``, a log
file) it degrades to plain lines, at most one every ``interval`` seconds plus the final one, so
logs stay readable.

Library code takes an optional ``progress`` callback-like object and calls ``advance``; the CLI
decides how to show it. ``Progress.null()`` shows nothing (the library default).

One progress truth: the terminal and the dashboard page show the same count and ETA. A
``Progress`` keeps its marks (start and every advance) on the wall clock (``time.time()``, the
clock of the scheduler's events) and tells its listeners (:meth:`Progress.listen`) each time
the count changes; ``train`` publishes that as a ``progress`` event, and the page computes its ETA
from the very same marks with the same :func:`recent_eta`, printed by the same
:func:`format_duration`.
"""

from __future__ import annotations

import bisect
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
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


def format_duration(seconds: float | None) -> str:
    """``"1 h 02 min"``, ``"3 min 05 s"``, ``"12 s"``, or ``"–"`` when unknown (the terminal's
    and the page's way of printing an ETA or an elapsed time)."""
    if seconds is None:
        return "–"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


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
        self._start = time.time()
        self._last_line = 0.0
        self._rich = None
        self._task = None
        self._depth = 0  # re-entrant: a library call may enter the Progress its caller entered
        self._marks: list[tuple[float, int]] = []  # (time, completed) at each advance
        self._base = 0
        self._note: str | None = None
        self._alert: str | None = None
        self._listeners: list[Callable[[Progress], None]] = []
        self._pending: threading.Timer | None = None  # a line held back by the interval
        self._lock = threading.RLock()

    @classmethod
    def null(cls) -> "Progress":
        """A progress object that shows nothing."""
        return cls("", enabled=False)

    def __enter__(self) -> "Progress":
        self._depth += 1
        if self._depth > 1:
            return self
        self._start = time.time()
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
        self._cancel_pending()
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        elif self.enabled and exc[0] is None:
            self._line(final=True)

    @property
    def elapsed(self) -> float:
        return time.time() - self._start

    @property
    def started(self) -> float:
        """When the count started (``time.time()``)."""
        return self._start

    @property
    def base(self) -> int:
        """Items counted as done before this run (:meth:`skip`): never in the rate."""
        return self._base

    def marks(self) -> list[tuple[float, int]]:
        """What the ETA is computed from: ``(started, base)``, then ``(time, completed)`` at
        each advance (wall clock)."""
        return [(self._start, self._base), *self._marks]

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the recent rate (:func:`recent_eta`) at ``now`` (default: the
        present, ``time.time()``), or None when it cannot be told yet.

        Skipped (resumed) items never count towards the rate.
        """
        if not self.total or not self._marks:
            return None
        return recent_eta(self.marks(), time.time() if now is None else now, self.completed,
                          self.total)

    def listen(self, listener: Callable[["Progress"], None]) -> Callable[[], None]:
        """Call ``listener(self)`` each time the count changes (after the mark is taken);
        returns the function that stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def skip(self, n: int, *, note: str | None = None) -> None:
        """Count ``n`` items done before this run (resumed work): shown, but not in the rate."""
        self._base += n
        self.completed += n
        self._note = note
        self._changed()
        self._show(self.completed == self.total)

    def advance(self, n: int = 1, *, note: str | None = None) -> None:
        self.completed += n
        if n:
            self._marks.append((time.time(), self.completed))
            self._changed()
        self._note = note
        self._show(self.completed == self.total, changed=bool(n))

    def _changed(self) -> None:
        for listener in self._listeners:
            listener(self)

    def alert(self, text: str | None, *, show: bool = False) -> None:
        """Say what the work is waiting on (a paused or silent worker), on every line until
        cleared with None; ``show`` prints a line now (else at the usual rate, even while
        nothing advances, so a stalled run keeps saying why)."""
        if text is None and self._alert is None:
            return
        self._alert = text
        self._show(show)

    def _show(self, now: bool, changed: bool = False) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            from rich.markup import escape

            desc = self.description if self._note is None else f"{self.description} ({self._note})"
            desc = escape(desc) + (f" [red]{escape(self._alert)}[/red]" if self._alert else "")
            self._rich.update(self._task, completed=self.completed, description=desc)
            return
        wait = self.interval - (time.time() - self._last_line)
        if now or wait <= 0:
            self._line()
        elif changed:
            # The count moved inside the interval: its line comes when the interval ends, not
            # at the next advance (which may be minutes away while the page already shows it).
            with self._lock:
                if self._pending is None:
                    self._pending = threading.Timer(wait, self._flush)
                    self._pending.daemon = True
                    self._pending.start()

    def _flush(self) -> None:
        with self._lock:
            if self._pending is not None:
                self._line()

    def _cancel_pending(self) -> None:
        with self._lock:
            if self._pending is not None:
                self._pending.cancel()
                self._pending = None

    def line(self, now: float | None = None, *, final: bool = False) -> str:
        """The plain progress line at ``now`` (default: the present)."""
        now = time.time() if now is None else now
        of = f"/{self.total}" if self.total is not None else ""
        eta = self.eta(now)
        tail = "done" if final else (f"eta {format_duration(eta)}" if eta is not None else "")
        extra = f" ({self._note})" if self._note and not final else ""
        alert = f" -- {self._alert}" if self._alert and not final else ""
        return (f"{self.description}: {self.completed}{of} {self.unit} "
                f"[{now - self._start:.1f} s{', ' + tail if tail else ''}]{extra}{alert}")

    def _line(self, *, final: bool = False) -> None:
        with self._lock:
            self._cancel_pending()
            self._last_line = time.time()
            # One write: print's text and newline are two, and a Ctrl-C raised between them
            # (or a line from the pending timer's thread) glued the next message to this line.
            self.stream.write(self.line(self._last_line, final=final) + "\n")
            self.stream.flush()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
