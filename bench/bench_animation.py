"""Even against uniform animation timing, rendered in the same run: smoothness and the pre-pass's cost.

    .venv/bin/python bench/bench_animation.py [--job jobs/animation.yaml] [--out /tmp/bench-animation]
    .venv/bin/python bench/bench_animation.py --test-animations   # the test suite's four, then the example

Renders the job three times in this process (``--probes N`` sets the even variants'
pre-pass to N probes per segment): with ``interpolate.timing: uniform`` (the
baseline, the frames of earlier versions), with ``timing: even, spread: segment`` (every
keyframe on its frame) and with ``timing: even, spread: video`` (interior keyframes move
with the measured change). Prints, for each, the largest consecutive-frame change over
the median (the smoothness report's ``max_over_median``: mean |RGB| difference, 0-255,
of consecutive frames; target with even timing: at most 3) for the whole video and
inside each keyframe segment, and what even timing costs: the pre-pass over the final
render, and the even run's rendering (pre-pass and render) over the uniform run's, less
one ("extra"; target: at most 0.30). Where the pre-pass's candidates are the frames
(linear easing, no per-frame schedule) the final render is a frame or two and "extra" is
the figure that counts. Both in CPU time of this process (time.process_time: the
machine is shared, so wall-clock seconds mislead) and in wall seconds. Model loading
is left out of both figures. The load of other processes moves even CPU time (caches and
memory bandwidth are shared), so ``--repeat N`` renders the uniform and the video-spread
variants N more times, alternated, into fresh folders, and prints each run's extra and
the pooled one (all even runs over all uniform runs).

``--test-animations`` runs the test suite's four three-keyframe animations (sdbatch-tiny,
6 DDIM steps; tests/test_animation.py EVEN_PAIRS), then the example.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml


class Clock:
    """CPU and wall seconds of Renderer.render calls, split into the pre-pass and the final render."""

    def __init__(self):
        self.phase = "render"
        self.cpu = {"prepass": 0.0, "render": 0.0}
        self.wall = {"prepass": 0.0, "render": 0.0}
        self.items = {"prepass": 0, "render": 0}

    def install(self):
        from sdbatch.render import Renderer
        from sdbatch.run import LocalExecutor

        clock, render, time_frames = self, Renderer.render, LocalExecutor._time_frames

        def timed_render(renderer, items):
            renderer.model_for(items[0])  # a model's first load is not rendering
            cpu, wall = time.process_time(), time.monotonic()
            try:
                return render(renderer, items)
            finally:
                clock.cpu[clock.phase] += time.process_time() - cpu
                clock.wall[clock.phase] += time.monotonic() - wall
                clock.items[clock.phase] += len(items)

        def timed_frames(executor, total):
            clock.phase = "prepass"
            try:
                return time_frames(executor, total)
            finally:
                clock.phase = "render"

        Renderer.render, LocalExecutor._time_frames = timed_render, timed_frames

    def reset(self):
        for figures in (self.cpu, self.wall, self.items):
            figures.update(prepass=0, render=0)


def run(job: Path, interpolate: dict, out: Path, clock: Clock):
    """Render ``job`` with the given interpolate settings into ``out``; its summary."""
    from sdbatch.job import load_job
    from sdbatch.plugins import load_registry
    from sdbatch.run import LocalExecutor

    data = yaml.safe_load(job.read_text())
    settings = data["animation"].setdefault("interpolate", {})
    settings.update(interpolate)
    if settings.get("timing") != "even":
        settings.pop("probes", None)  # probes measure for even timing only
    variant = out.with_suffix(".yaml")
    variant.write_text(yaml.safe_dump(data, sort_keys=False))
    registry = load_registry()
    clock.reset()
    return LocalExecutor(load_job(variant, registry), registry, out, quiet=True).run()


def bench(job: Path, root: Path, clock: Clock, args) -> None:
    """Uniform, even over the video and even per segment for one job; the figures printed."""
    runs = [("uniform", {"timing": "uniform", "spread": "segment"}), ("video", {"timing": "even", "spread": "video"}),
            ("segment", {"timing": "even", "spread": "segment"})]
    if args.probes:
        for name, interpolate in runs[1:]:
            interpolate["probes"] = args.probes
    figures, uniform = {}, {}
    for name, interpolate in runs:
        summary = run(job.resolve(), interpolate, root / name, clock)
        smooth = next(iter(summary.notes["smoothness"].values()))
        figures[name] = smooth
        inside = ", ".join(f"{s['from']}->{s['to']}: {s['max_over_median']:.2f}" for s in smooth["segments"])
        label = "uniform" if name == "uniform" else f"even, spread: {name}"
        line = (f"{label:22s} max/median {smooth['max_over_median']:5.2f} whole video (in segments {inside}; "
                f"{len(smooth['jumps'])} jumps, {len(smooth['detours'])} detours)")
        if name == "uniform":
            uniform = {"cpu": clock.cpu["render"], "wall": clock.wall["render"]}
        note = summary.notes.get("timing")
        if note and note["segments_measured"]:
            cpu, wall = sum(clock.cpu.values()), sum(clock.wall.values())
            share = clock.cpu["prepass"] / clock.cpu["render"] if clock.cpu["render"] else float("inf")
            line += (f"\n{'':22s} pre-pass {note['pictures']} pictures, {note.get('frames_from_candidates', 0)} of "
                     f"them frames; {clock.items['render']} frames rendered after it: pre-pass / render CPU "
                     f"{clock.cpu['prepass']:.1f} s / {clock.cpu['render']:.1f} s = {share:.2f}"
                     f"\n{'':22s} extra over uniform: CPU "
                     f"{cpu:.1f} s / {uniform['cpu']:.1f} s - 1 = {cpu / uniform['cpu'] - 1:.2f}, wall "
                     f"{wall:.1f} s / {uniform['wall']:.1f} s - 1 = {wall / uniform['wall'] - 1:.2f}")
        print(line, flush=True)
    if args.repeat:
        extras, shares, even_cpu, uniform_cpu = [], [], 0.0, 0.0
        prepass_cpu, render_cpu = 0.0, 0.0
        for r in range(args.repeat):  # alternated, so a busy spell of the machine hits both
            run(job.resolve(), dict(runs[0][1]), root / f"uniform-repeat-{r}", clock)
            base = clock.cpu["render"]
            run(job.resolve(), dict(runs[1][1]), root / f"video-repeat-{r}", clock)
            extras.append(sum(clock.cpu.values()) / base - 1)
            even_cpu, uniform_cpu = even_cpu + sum(clock.cpu.values()), uniform_cpu + base
            prepass_cpu, render_cpu = prepass_cpu + clock.cpu["prepass"], render_cpu + clock.cpu["render"]
            if clock.cpu["render"]:
                shares.append(clock.cpu["prepass"] / clock.cpu["render"])
        if len(shares) == args.repeat:  # probes: the pre-pass's share of the even run's own render
            print(f"{'':22s} pre-pass / render, CPU, {args.repeat} more runs: {', '.join(f'{x:.2f}' for x in shares)}"
                  f"; pooled {prepass_cpu:.1f} s / {render_cpu:.1f} s = {prepass_cpu / render_cpu:.2f}", flush=True)
        print(f"{'':22s} extra over uniform, CPU, {args.repeat} more runs: {', '.join(f'{x:.2f}' for x in extras)}; "
              f"pooled {even_cpu:.1f} s / {uniform_cpu:.1f} s - 1 = {even_cpu / uniform_cpu - 1:.2f}", flush=True)
    ratio = figures["uniform"]["max_over_median"] / figures["video"]["max_over_median"]
    print(f"even timing spread over the video is {ratio:.1f}x smoother (max/median) than uniform; outputs in {root}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, default=Path("jobs/animation.yaml"))
    parser.add_argument("--test-animations", action="store_true", help="the test suite's four, then the job")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--repeat", type=int, default=0, help="re-run the video-spread variant N times for its cost")
    parser.add_argument("--probes", type=int, default=None,
                        help="interpolate.probes of the even variants (default: the job's, else sdbatch's)")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-animation-"))
    root.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    clock.install()
    jobs = {}
    if args.test_animations:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_timing_budget import jobs as timing_jobs

        for name, text in timing_jobs().items():
            if name != "example":
                jobs[name] = root / f"{name}.yaml"
                jobs[name].write_text(text.replace("outputs: [frames]", "outputs: [frames, {video: {format: gif}}]"))
    jobs[args.job.stem] = args.job
    for name, job in jobs.items():
        print(f"== {name}", flush=True)
        (root / name).mkdir(parents=True, exist_ok=True)
        bench(job, root / name, clock, args)


if __name__ == "__main__":
    main()
