"""Even against uniform animation timing, rendered in the same run: smoothness and the pre-pass's cost.

    .venv/bin/python bench/bench_animation.py [--job jobs/animation.yaml] [--out /tmp/bench-animation]

Renders the job twice with ``sdbatch run``: once with ``interpolate.timing: uniform`` (the
baseline, today's frames) and once with ``timing: even``. Prints, for each, the largest
consecutive-frame change over the median (the smoothness report's ``max_over_median``;
target with even timing: at most 3), and for even timing the pre-pass's seconds over the
final render's seconds (target: at most 0.30). Max/median is printed for the whole
video and inside each keyframe segment (timing cannot even out how far apart the
keyframes themselves are).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def run(job: Path, timing: str, out: Path) -> dict:
    """Render ``job`` with the given timing into ``out``; its summary.json."""
    data = yaml.safe_load(job.read_text())
    data["animation"].setdefault("interpolate", {})["timing"] = timing
    variant = out.with_suffix(".yaml")
    variant.write_text(yaml.safe_dump(data, sort_keys=False))
    subprocess.run([sys.executable, "-m", "sdbatch", "run", str(variant), "-o", str(out), "-q"], check=True)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, default=Path("jobs/animation.yaml"))
    parser.add_argument("--out", type=Path, default=None, help="keep the two runs here (default: a temp folder)")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-animation-"))
    root.mkdir(parents=True, exist_ok=True)
    job = args.job.resolve()
    figures = {}
    for timing in ("uniform", "even"):
        summary = run(job, timing, root / timing)
        smooth = next(iter(summary["notes"]["smoothness"].values()))
        figures[timing] = smooth
        inside = ", ".join(f"{s['from']}->{s['to']}: {s['max_over_median']:.2f}" for s in smooth["segments"])
        line = (f"{timing:8s} max/median {smooth['max_over_median']:6.2f} (in segments {inside}; "
                f"{len(smooth['jumps'])} jumps, {len(smooth['detours'])} detours)")
        if timing == "even":
            timing_note = summary["notes"]["timing"]
            line += (f"; pre-pass {timing_note['seconds']:.1f} s ({timing_note['probes']} probes) over render "
                     f"{summary['render_seconds']:.1f} s = {timing_note['seconds'] / summary['render_seconds']:.2f}")
        print(line, flush=True)
    ratio = figures["uniform"]["max_over_median"] / figures["even"]["max_over_median"]
    print(f"even timing is {ratio:.1f}x smoother (max/median) than uniform; outputs in {root}")


if __name__ == "__main__":
    main()
