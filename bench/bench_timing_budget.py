"""What the even-timing pre-pass's probe budget buys: replayed on pictures rendered every 1/128 of t.

    .venv/bin/python bench/bench_timing_budget.py [--out /tmp/timing-budget] [--grid 128]

Probes apart from frames (sdbatch.timing's rounds where frames cannot be candidates; the
four test animations' default, candidate frames, is measured by rendering:
bench_animation.py --test-animations). For the example (jobs/animation.yaml) and the test
suite's four three-keyframe animations (tests/test_animation.py EVEN_PAIRS, 6 DDIM steps)
it renders every segment's probes at
t = k/grid once (about four minutes on two CPU cores; cached in --out, so a second run
only replays), then replays, without rendering:

1. sdbatch's own pre-pass (sdbatch.timing's rounds and bisection) at 6 (the default for
   24 frames), 8, 12, 16, 24 and 32 probes per segment (nan: it bisected finer than the
   grid, which a replay cannot follow; render those: bench_animation.py --probes N);
2. 128 other schedules at about the default's cost: a first round of 3, 5 or 9 probes per
   segment, later rounds of other sizes, bisection by measured or by estimated change,
   intervals' change scaled by how much their parent grew when split, two tolerances.

A replayed frame is the rendered picture nearest its t, so figures differ from a real run
by what lies between grid points (the default's replay: 3.19 on the example, 2.87 rendered).
Each line prints the video's max/median consecutive change per animation (the smoothness
report's measure; the issue's target is 3) and the pre-pass's cost over the render by the
CPU model of sdbatch/timing.py (0.45 s a batch, 0.23 s a picture at 20 steps, batches of 8).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

BATCH_SECONDS, PICTURE_SECONDS = 0.45, 0.23
RENDER_SECONDS = 7 * BATCH_SECONDS + 49 * PICTURE_SECONDS  # 49 frames in batches of 8
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # plugins.video's smoothness: the report's own measure


def jobs() -> dict:
    """name -> job text: the four test animations and the example."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_animation import EVEN_PAIRS

    texts = {}
    for name, pairs in EVEN_PAIRS.items():
        keyframes = "\n".join(f'    {frame}: {{prompt: "{prompt}", seed: {seed}}}'
                              for frame, (prompt, seed) in zip((0, 24, 48), pairs))
        texts[name] = (f"model: sdbatch-tiny\nsampler: DDIM\nsteps: 6\nbatch_size: 8\nanimation:\n  keyframes:\n"
                       f"{keyframes}\n  interpolate: {{timing: even, spread: video}}\noutputs: [frames]\n")
    example = ROOT / "jobs" / "animation.yaml"
    texts["example"] = example.read_text()
    return texts


def dense_pictures(name: str, text: str, out: Path, grid: int) -> list:
    """Per segment, the probes' downscaled pictures at t = k/grid (rendered once, then read from out)."""
    cache = out / f"{name}-{grid}.npz"
    if cache.is_file():
        data = np.load(cache)
        return [data[key] for key in sorted(data.files)]
    from sdbatch import timing
    from sdbatch.job import load_job
    from sdbatch.plugins import load_registry
    from sdbatch.run import LocalExecutor

    captured = []
    first, budget, measure, candidates = timing.FIRST, timing.BUDGET, timing._measure, timing._frames_are_candidates
    timing.FIRST, timing.BUDGET = tuple(k / grid for k in range(grid + 1)), 0.0  # one round: the whole grid
    timing._frames_are_candidates = lambda *args: False  # probes at the grid's positions, not candidates

    def keep(groups, render, batch_size):
        measured = measure(groups, render, batch_size)
        captured.extend(probes for group in groups for probes in group.members)
        return measured

    timing._measure = keep
    try:
        path = out / f"{name}.yaml"
        path.write_text(text)
        registry = load_registry()
        job = load_job(path, registry)
        executor = LocalExecutor(job, registry, out / name, quiet=True)
        executor._time_frames(len(job.plan))
        executor.context.out.close()
    finally:
        timing.FIRST, timing.BUDGET, timing._measure, timing._frames_are_candidates = first, budget, measure, candidates
    segments = [np.stack([probes.pictures[t] for t in probes.ts]) for probes in captured]
    np.savez(cache, **{f"segment{i}": pictures for i, pictures in enumerate(segments)})
    return segments


class Replay:
    """One animation's dense pictures: probes and frames are looked up, never rendered."""

    def __init__(self, segments: list, grid: int):
        self.segments, self.grid = segments, grid

    def picture(self, segment: int, t: float):
        return self.segments[segment][round(t * self.grid)]

    def video_max_over_median(self, curves: list, totals: list, frames: int = 48) -> float:
        """Frames placed as spread: video places them from these curves; the smoothness report's max/median."""
        from plugins.video import smoothness
        from sdbatch.animation import apportion, position_for

        video = []
        for segment, (curve, count) in enumerate(zip(curves, apportion(frames, totals))):
            video += [self.picture(segment, position_for(curve, i / count)) for i in range(segment > 0, count + 1)]
        return smoothness(video)["max_over_median"]

    def sdbatch(self, per_segment: int) -> tuple[float, float]:
        """(max/median, cost) of sdbatch.timing's own rounds with this many probes per segment; NaN where a
        probe falls between grid points (large budgets bisect down to 1/1024 of t)."""
        from sdbatch import timing

        timeline = SimpleNamespace(probes=per_segment)
        members = [timing._Probes(None, SimpleNamespace(span=24, first=24 * i), timeline)
                   for i in range(len(self.segments))]
        group, rounds, probes = timing._Group(members), 0, 0
        while True:
            for segment, member in enumerate(members):
                for t in member.missing():
                    if abs(t * self.grid - round(t * self.grid)) > 1e-9:
                        return float("nan"), float("nan")  # bisected finer than the grid: not replayable
                    member.pictures[t] = self.picture(segment, t)
                    probes += 1
            rounds += 1
            if not group.refine():
                break
        curves = [member.curve(0) for member in members]
        ratio = self.video_max_over_median(curves, [sum(member.changes()) for member in members])
        return ratio, (rounds * BATCH_SECONDS + probes * PICTURE_SECONDS) / RENDER_SECONDS

    def schedule(self, first: int, rounds: list, descend: bool, scale: bool, tolerance: float) -> float:
        """max/median after a first round of ``first`` evenly spaced probes per segment and later rounds of the
        given sizes, each bisecting the intervals of largest change (estimated when ``descend`` in the first)."""
        from sdbatch.timing import distance

        grid = self.grid
        ts = [sorted({round(grid * k / (first - 1)) for k in range(first)}) for _ in self.segments]

        def change(segment, a, b):
            return distance(self.segments[segment][a], self.segments[segment][b])

        def intervals(segment):
            out = []
            for a, b in zip(ts[segment], ts[segment][1:]):
                growth, width = 1.0, b - a
                parent = a - a % (2 * width)
                if scale and parent + 2 * width <= grid and {parent, parent + width, parent + 2 * width} <= set(
                        ts[segment]) and change(segment, parent, parent + 2 * width) > 0:
                    split = change(segment, parent, parent + width) + change(segment, parent + width,
                                                                              parent + 2 * width)
                    growth = max(1.0, split / change(segment, parent, parent + 2 * width))
                out.append((change(segment, a, b) * growth, a, b, segment))
            return out

        for number, size in enumerate(rounds):
            measured = [i for segment in range(len(ts)) for i in intervals(segment)]
            share = sum(i[0] for i in measured) / 48
            uneven = [i for i in measured if i[0] > tolerance * share and i[2] - i[1] > 1]
            chosen = []
            if descend and number == 0:
                while len(chosen) < size and uneven:
                    best = max(uneven, key=lambda i: (i[0], i[1]))
                    uneven.remove(best)
                    chosen.append(best)
                    middle = (best[1] + best[2]) // 2
                    uneven += [h for h in ((best[0] / 2, best[1], middle, best[3]),
                                           (best[0] / 2, middle, best[2], best[3]))
                               if h[0] > tolerance * share and h[2] - h[1] > 1]
            else:
                chosen = sorted(uneven, key=lambda i: (-i[0], i[1]))[:size]
            for _, a, b, segment in chosen:
                ts[segment] = sorted(set(ts[segment]) | {(a + b) // 2})
        curves, totals = [], []
        for segment in range(len(ts)):
            changes = [i[0] for i in intervals(segment)]
            cumulative = np.concatenate([[0.0], np.cumsum(changes) / sum(changes)])
            cumulative[-1] = 1.0
            curves.append({"t": [t / grid for t in ts[segment]], "change": cumulative.tolist()})
            totals.append(sum(changes))
        return self.video_max_over_median(curves, totals)


def schedules(limit: float):
    """The schedules of about the default's cost: (first, rounds, descend, scale, tolerance)."""
    splits = ([], [2], [3], [4], [5], [6], [2, 2], [3, 3], [4, 2], [2, 4], [3, 2], [2, 3], [4, 4], [2, 2, 2],
              [3, 2, 2], [4, 3, 3], [6, 2, 4])
    for first in (3, 5, 9):
        for rounds in splits:
            cost = ((1 + len(rounds)) * BATCH_SECONDS + (2 * first + sum(rounds)) * PICTURE_SECONDS) / RENDER_SECONDS
            if cost > limit:
                continue
            for scale in (False, True):
                for tolerance in (1.0, 1.5):
                    for descend in ((False, True) if rounds else (False,)):
                        yield (first, rounds, descend, scale, tolerance), cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "sdbatch-timing-budget")
    parser.add_argument("--grid", type=int, default=128, help="pictures per segment's t (rendered once, cached)")
    parser.add_argument("--limit", type=float, default=0.305, help="the schedules' largest cost over the render")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    replays = {name: Replay(dense_pictures(name, text, args.out, args.grid), args.grid)
               for name, text in jobs().items()}
    names = list(replays)
    print(f"animations: {', '.join(names)}; replayed on pictures every 1/{args.grid} of t (cached in {args.out})")
    for per_segment in (6, 8, 12, 16, 24, 32):
        figures = [replays[name].sdbatch(per_segment) for name in names]
        print(f"sdbatch, probes: {per_segment:2d}  " + " ".join(f"{ratio:5.2f}" for ratio, _ in figures)
              + f"  | under 3: {sum(ratio <= 3 for ratio, _ in figures)}/{len(names)}, cost {figures[-1][1]:.2f}")
    tried, best = 0, []
    for settings, cost in schedules(args.limit):
        figures = [replays[name].schedule(*settings) for name in names]
        tried += 1
        best.append((sum(ratio <= 3 for ratio in figures), -max(figures), settings, cost, figures))
    best.sort(key=lambda row: (row[0], row[1]), reverse=True)
    print(f"{tried} schedules at most {args.limit} of the render; the best three:")
    for passed, _, (first, rounds, descend, scale, tolerance), cost, figures in best[:3]:
        print(f"  first {first}/segment, rounds {rounds}, descend {descend}, scaled {scale}, tolerance {tolerance}: "
              + " ".join(f"{ratio:5.2f}" for ratio in figures) + f"  | under 3: {passed}/{len(names)}, cost {cost:.2f}")


if __name__ == "__main__":
    main()
