"""Progress lines: rates and ETAs from rendered items only, smoothed, never timed over a burst."""

from __future__ import annotations

import io
import re

from sdbatch.progress import Progress


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _lines(stream) -> list[str]:
    return stream.getvalue().splitlines()


def _rate(line: str) -> float:
    return float(re.search(r"([\d.]+) items/s", line).group(1))


def test_first_burst_gives_no_rate_and_no_zero_eta(monkeypatch):
    """A batch of 8 reaches the writer at once: its items are not timed over ~0 s."""
    monkeypatch.setenv("SDBATCH_PROGRESS_INTERVAL", "0")
    clock, stream = Clock(), io.StringIO()
    progress = Progress(80, stream=stream, clock=clock)
    clock.now += 30  # model loading and the first batch
    for _ in range(8):
        clock.now += 0.001
        progress.update(1)
    first = _lines(stream)[0]
    assert first == "sdbatch: 1/80 items (1.2%), ETA ?"
    assert all("ETA ?" in line and "items/s" not in line for line in _lines(stream))


def test_rate_counts_rendered_items_in_batches_and_is_smoothed(monkeypatch):
    monkeypatch.setenv("SDBATCH_PROGRESS_INTERVAL", "10")
    clock, stream = Clock(), io.StringIO()
    progress = Progress(400, stream=stream, clock=clock)
    for batch in range(20):  # 8 items every 8 s: a true rate of 1 item/s
        clock.now += 8
        for _ in range(8):
            clock.now += 0.001
            progress.update(1)
    rates = [_rate(line) for line in _lines(stream) if "items/s" in line]
    assert len(rates) >= 5
    assert all(0.5 < r < 1.6 for r in rates), rates  # never the burst's thousands of items/s
    assert abs(rates[-1] - 1.0) < 0.15
    eta = re.search(r"ETA (\d+)m(\d+)s", _lines(stream)[-1])
    remaining = 400 - 160
    assert abs(int(eta.group(1)) * 60 + int(eta.group(2)) - remaining) < 0.15 * remaining


def test_failures_advance_the_count_not_the_rate(monkeypatch):
    monkeypatch.setenv("SDBATCH_PROGRESS_INTERVAL", "10")
    clock, stream = Clock(), io.StringIO()
    progress = Progress(100, stream=stream, clock=clock)
    progress.update(1)
    for _ in range(5):
        clock.now += 5
        progress.update(1)  # one rendered item every 5 s
        progress.update(10, rendered=False)  # and ten instant failures
    progress.close()
    last = _lines(stream)[-1]
    assert _rate(last) < 0.3
    assert last.startswith("sdbatch: 56/100 items")


def test_finished_run_shows_no_pending_eta(monkeypatch):
    monkeypatch.setenv("SDBATCH_PROGRESS_INTERVAL", "1000")
    clock, stream = Clock(), io.StringIO()
    progress = Progress(3, stream=stream, clock=clock)
    for _ in range(3):
        clock.now += 2
        progress.update(1)
    progress.close()
    assert _lines(stream)[-1] == "sdbatch: 3/3 items (100.0%), 0.50 items/s, ETA 0m00s"


def test_a_steady_stream_is_measured_without_pauses(monkeypatch):
    """On a fast device items arrive with no pause between batches: samples are still taken."""
    monkeypatch.setenv("SDBATCH_PROGRESS_INTERVAL", "5")
    clock, stream = Clock(), io.StringIO()
    progress = Progress(1000, stream=stream, clock=clock)
    for _ in range(400):
        clock.now += 0.05  # 20 items/s
        progress.update(1)
    rates = [_rate(line) for line in _lines(stream)]
    assert rates and all(abs(r - 20) < 0.5 for r in rates), rates


def test_the_first_line_says_how_many_items_and_how_long(tmp_path):
    from sdbatch.progress import start_line

    assert start_line("grid", 24, 0) == (
        "sdbatch: grid: 24 items to render; the time it takes follows once the first batches are done")
    summary = tmp_path / "summary.json"
    summary.write_text('{"rendered": 10, "render_seconds": 4.0}')
    stream = io.StringIO()
    Progress(24, 4, stream=stream, title="grid", history=summary)
    assert stream.getvalue() == "sdbatch: grid: 20 items to render, 4 already done; about 0m08s at the last run's " \
                                "2.50 items/s\n"
    assert start_line("grid", 60000, 0, 0.5) == (
        "sdbatch: grid: 60000 items to render; about 33h20m at the last run's 0.50 items/s. "
        "A big job: --limit N renders the first N items")


def test_the_first_measured_rate_is_shown_at_once(monkeypatch):
    monkeypatch.setenv("SDBATCH_PROGRESS_INTERVAL", "60")
    clock, stream = Clock(), io.StringIO()
    progress = Progress(100, stream=stream, clock=clock)
    for _ in range(3):  # three batches of 4, 4 s apart: a rate after the second
        clock.now += 4
        for _ in range(4):
            progress.update(1)
    assert _lines(stream) == ["sdbatch: 9/100 items (9.0%), 1.00 items/s, ETA 1m31s"]
