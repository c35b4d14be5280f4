"""Progress a person can follow in a terminal or in ``ray job logs``: how much of the total is
done, at what rate, and how long is left, as one short line printed at a steady interval.

The rate counts only what this process did (a resumed run does not count the work its
checkpoint already held), so the time left is what this run will still take. Where the rate
changes as a run goes (a mining pool that grows as the autoscaler adds GPU nodes), a window
(``window_s``) makes it the rate of the last minutes instead of the whole run's.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float | None) -> str:
    """``3h 05m``, ``4m 09s``, ``42s``; ``?`` when not known yet."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


class Progress:
    """``total`` units of work (None when not known), of which ``done`` were done before this process
    started; :meth:`line` says where a run is, :meth:`due` whether the next line is due after
    ``every_s`` seconds. ``window_s``: the rate over at least the last ``window_s`` seconds (from
    the newest line printed that long ago; the whole run's until then), or None for the whole run's."""

    def __init__(self, total: int | None, unit: str, done: int = 0, every_s: float = 20.0,
                 clock: Callable[[], float] = time.perf_counter, window_s: float | None = None) -> None:
        if total is not None and total < 0:
            raise ValueError(f"a progress total cannot be negative, got {total}")
        if window_s is not None and window_s <= 0:
            raise ValueError(f"a progress window must be positive seconds, got {window_s}")
        self.total, self.unit, self.every_s, self.window_s = total, unit, every_s, window_s
        self._clock = clock
        self._started = self._last = clock()
        self._marks = deque([(self._started, done)])  # (time, units done) at the start and at each line

    def due(self) -> bool:
        """True once ``every_s`` seconds have passed since the last line (or the start)."""
        return self._clock() - self._last >= self.every_s

    def rate(self, done: int) -> float:
        """Units a second since this process started, or over the window."""
        now = self._clock()
        while self.window_s is not None and len(self._marks) > 1 and now - self._marks[1][0] >= self.window_s:
            self._marks.popleft()
        since, done_then = self._marks[0]
        return (done - done_then) / (now - since) if now > since else 0.0

    def _printed(self, done: int) -> None:
        self._last = self._clock()
        if self.window_s is not None:
            self._marks.append((self._last, done))

    def seconds_left(self, done: int) -> float | None:
        rate = self.rate(done)
        if self.total is None or rate <= 0:
            return None
        return max(0, self.total - done) / rate

    def left(self, done: int) -> str:
        """``30%, 3m 04s left`` (``?`` before any rate), to end a step's own progress line; the
        line counted as printed."""
        share = 100 * done / self.total if self.total else 100.0
        left = format_duration(self.seconds_left(done))
        self._printed(done)
        return f"{share:.0f}%, {left} left"

    def line(self, done: int) -> str:
        """``120/400 iterations (30%), 1.52 iterations/s, 3m 04s left`` (below 0.1 a second, the
        time per unit: ``6m 50s per trial``; no share or time left without a total), and the
        line counted as printed."""
        rate = self.rate(done)
        pace = (f"{rate:.3g} {self.unit}/s" if rate >= 0.1 or rate <= 0 else
                f"{format_duration(1 / rate)} per {self.unit.removesuffix('s')}")
        if self.total is None:
            text = f"{done} {self.unit}, {pace}"
        else:
            share = 100 * done / self.total if self.total else 100.0
            left = format_duration(self.seconds_left(done))
            text = f"{done}/{self.total} {self.unit} ({share:.0f}%), {pace}, {left} left"
        self._printed(done)
        return text
