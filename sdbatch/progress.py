"""Progress for long runs: a tqdm bar on a terminal, plain periodic lines otherwise, or nothing."""

from __future__ import annotations

import os
import sys
import threading
import time


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Counts finished items against a total; chooses its display from the stream."""

    def __init__(self, total: int, initial: int = 0, quiet: bool = False, stream=None, label: str = "items"):
        self.total, self.done, self.label = total, initial, label
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.start = time.monotonic()
        self.initial = initial
        self.interval = float(os.environ.get("SDBATCH_PROGRESS_INTERVAL", "10"))
        self._last_line = self.start
        self._bar = None
        self._first: tuple[float, int] | None = None
        self._lock = threading.Lock()
        self._note = ""
        if not quiet and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit=" " + label, file=self.stream, dynamic_ncols=True,
                             smoothing=0.1)

    def update(self, count: int = 1) -> None:
        with self._lock:  # the render loop and the writer thread both report
            self._update(count)

    def _update(self, count: int) -> None:
        if self._first is None:
            # Rates count from the first finished item: start-up and model loading are not throughput.
            self._first = (time.monotonic(), self.done)
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif not self.quiet and time.monotonic() - self._last_line >= self.interval:
            self._line()

    def note(self, text: str) -> None:
        """Extra words for the bar and the progress lines (writers' progress, e.g. shards done)."""
        if text == self._note:
            return
        self._note = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    @property
    def rate(self) -> float:
        """Items per second since the first item finished."""
        if self._first is None:
            return 0.0
        began, done_then = self._first
        elapsed = time.monotonic() - began
        return (self.done - done_then) / elapsed if elapsed > 0 else 0.0

    def _line(self) -> None:
        self._last_line = time.monotonic()
        rate = self.rate
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        note = f", {self._note}" if self._note else ""
        print(f"sdbatch: {self.done}/{self.total} {self.label} ({percent:.1f}%), {rate:.2f} {self.label}/s, ETA {eta}"
              f"{note}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.quiet and self.done > self.initial:
            self._line()
