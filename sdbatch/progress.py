"""Progress for long runs: a tqdm bar on a terminal, plain periodic lines otherwise, or nothing.

Rates and ETAs come from rendered items only (failures advance the count, not the rate) and
are smoothed: an average over the last two minutes, measured between bursts (see ``Rate``).
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time

#: A pause longer than this between finished items ends a burst (a batch reaches the writer at once).
GAP_SECONDS = 0.25
#: In a steady stream (no pauses) a rate sample is still taken this often.
SAMPLE_SECONDS = 1.0
#: The rate is the average over this many seconds of samples: steady, yet it follows a change of pace.
WINDOW_SECONDS = 120.0

def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Rate:
    """Rendered items per second, the average over a window of samples taken between bursts.

    A sample (time, items so far) is taken where a burst ends, so a batch's items are never timed
    over the milliseconds the writer takes to store them, and the first batch (whose time includes
    loading the model) only sets where the count starts.
    """

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.rendered = 0
        self._first: float | None = None  # when the current burst began
        self._last: float | None = None  # when the latest item finished
        self._samples: collections.deque = collections.deque()

    def add(self, count: int) -> None:
        now = self.clock()
        if self._first is None:
            self._first = now
        elif now - self._last > GAP_SECONDS:  # a new burst: the previous one ended at _last
            self._sample(self._last, self.rendered)
            self._first = now
        elif now - max(self._samples[-1][0] if self._samples else 0.0, self._first) >= SAMPLE_SECONDS:
            self._sample(now, self.rendered)  # a steady stream, going for a while
        self._last = now
        self.rendered += count

    def _sample(self, when: float, rendered: int) -> None:
        self._samples.append((when, rendered))
        while len(self._samples) > 2 and when - self._samples[1][0] >= WINDOW_SECONDS:
            self._samples.popleft()

    def current(self) -> float:
        """Items per second over the window; 0 until two samples are apart."""
        if self._last is not None and self.clock() - self._last > GAP_SECONDS:
            samples = [*self._samples, (self._last, self.rendered)]  # the latest burst has ended
        else:
            samples = list(self._samples)
        if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return 0.0
        (began, first), (ended, last) = samples[0], samples[-1]
        return (last - first) / (ended - began)


#: A run with more items than this to render says it is big in its first line.
BIG_ITEMS = 10_000


def previous_rate(summary_path) -> float:
    """Items per second of the last run into the same folder (its summary.json), or 0."""
    import json
    from pathlib import Path

    try:
        summary = json.loads(Path(summary_path).read_text())
        return summary["rendered"] / summary["render_seconds"] if summary.get("render_seconds") else 0.0
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0.0


def start_line(title: str, total: int, done: int, rate: float = 0.0, label: str = "items") -> str:
    """What a run says first: how many items it will render and, where known, how long that takes."""
    todo = total - done
    line = f"sdbatch: {title}: {todo} {label} to render" + (f", {done} already done" if done else "")
    if rate > 0 and todo:
        line += f"; about {_duration(todo / rate)} at the last run's {rate:.2f} {label}/s"
    elif todo:
        line += "; the time it takes follows once the first batches are done"
    if todo > BIG_ITEMS:
        line += f". A big job: --limit N renders the first N {label}"
    return line


class Progress:
    """Counts finished items against a total; chooses its display from the stream."""

    def __init__(self, total: int, initial: int = 0, quiet: bool = False, stream=None, label: str = "items",
                 clock=time.monotonic, title: str = "", history=None):
        self.total, self.done, self.label = total, initial, label
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.clock = clock
        self.initial = initial
        self.interval = float(os.environ.get("SDBATCH_PROGRESS_INTERVAL", "10"))
        self._last_line = clock()
        self._bar = None
        self._rate = Rate(clock)
        self._lock = threading.Lock()
        self._note = ""
        self._measured = False  # the first line with a rate is shown at once, not after the interval
        if title and not quiet:
            print(start_line(title, total, initial, previous_rate(history) if history else 0.0, label),
                  file=self.stream, flush=True)
        if not quiet and self.stream.isatty():
            from tqdm import tqdm

            # tqdm's own rate would time the first burst; the postfix shows ours instead.
            self._bar = tqdm(total=total, initial=initial, unit=" " + label, file=self.stream, dynamic_ncols=True,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def update(self, count: int = 1, rendered: bool = True) -> None:
        """``count`` more items finished; ``rendered=False`` for failures (counted, not timed)."""
        with self._lock:  # the render loop and the writer thread both report
            self._update(count, rendered)

    def _update(self, count: int, rendered: bool) -> None:
        if rendered:
            self._rate.add(count)
        self.done += count
        if self._bar is not None:
            if self.clock() - self._last_line >= 1.0:
                self._last_line = self.clock()
                self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(count)
        elif not self.quiet and (self.clock() - self._last_line >= self.interval
                                 or not self._measured and self.rate > 0):
            self._measured = self.rate > 0
            self._line()

    def note(self, text: str) -> None:
        """Extra words for the bar and the progress lines (writers' progress, e.g. shards done)."""
        if text == self._note:
            return
        self._note = text
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)

    @property
    def rate(self) -> float:
        """Rendered items per second, smoothed; 0 until one can be measured."""
        return self._rate.current()

    def eta(self) -> str:
        rate = self.rate
        if self.done >= self.total:
            return "0m00s"
        return _duration((self.total - self.done) / rate) if rate > 0 else "?"

    def _postfix(self) -> str:
        rate = self.rate
        shown = f"{rate:.2f} {self.label}/s, ETA {self.eta()}" if rate > 0 else f"ETA {self.eta()}"
        return shown + (f", {self._note}" if self._note else "")

    def _line(self) -> None:
        self._last_line = self.clock()
        percent = 100.0 * self.done / self.total if self.total else 100.0
        print(f"sdbatch: {self.done}/{self.total} {self.label} ({percent:.1f}%), {self._postfix()}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.quiet and self.done > self.initial:
            self._line()
