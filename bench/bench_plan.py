"""Planning cost of a 1,000,000-item grid: count, full iteration, peak memory.

    .venv/bin/python bench/bench_plan.py [--items 1000000]

Each measurement runs in a fresh subprocess so peak memory (VmHWM) is its own. The
baseline is the least any planner can do: itertools.product over the same axis values,
yielding one small dict per item (no ids). Ratios compare sdbatch with that baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

JOB = """
model: {model}
steps: 20
sweep:
  prompt: ["a red circle", "a blue square", "a green triangle", "a purple circle"]
  guidance: [5, 7.5]
  sampler: ["Euler a", "DPM++ 2M Karras"]
  seed: {{start: 0, count: {seeds}}}
"""

PROBE = r"""
import json, resource, sys, time


def peak_mb():
    # VmHWM starts afresh at exec; ru_maxrss would inherit the parent's high-water mark.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


mode, job = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if mode == "baseline":
    import itertools
    prompts = ["a red circle", "a blue square", "a green triangle", "a purple circle"]
    n = int(sys.argv[3]) // 16
    count = 0
    for p, g, s, seed in itertools.product(prompts, [5, 7.5], ["Euler a", "DPM++ 2M Karras"], range(n)):
        item = {"prompt": p, "guidance": g, "sampler": s, "seed": seed}
        count += 1
    counted = None
else:
    from sdbatch.job import load_job
    from sdbatch.plugins import load_registry
    plan = load_job(job, load_registry()).plan
    t1 = time.perf_counter()
    counted = len(plan)
    t_count = time.perf_counter() - t1
    count = 0
    if mode == "iterate":
        for item in plan:
            item.id
            count += 1
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "items": count, "counted": counted,
                  "count_seconds": None if counted is None else t_count,
                  "torch": "torch" in sys.modules,
                  "peak_rss_mb": peak_mb()}))
"""


def probe(mode: str, job: Path, items: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(job), str(items)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--model", default="sdbatch-tiny")
    args = parser.parse_args()
    job = Path(tempfile.mkdtemp()) / "plan.yaml"
    job.write_text(JOB.format(model=args.model, seeds=args.items // 16))

    baseline = probe("baseline", job, args.items)
    count = probe("count", job, args.items)
    iterate = probe("iterate", job, args.items)
    n = iterate["items"]
    print(f"{n:,} items (4 prompts x 2 guidance x 2 samplers x {n // 16:,} seeds)")
    print(f"count:    {count['count_seconds'] * 1000:.2f} ms arithmetic; whole command {count['seconds']:.2f}s "
          f"incl. validation; peak RSS {count['peak_rss_mb']:.0f} MB; torch imported: {count['torch']}")
    print(f"iterate:  {iterate['seconds']:.1f}s ({n / iterate['seconds']:,.0f} items/s with ids), "
          f"peak RSS {iterate['peak_rss_mb']:.0f} MB")
    print(f"baseline: {baseline['seconds']:.1f}s (itertools.product of dicts), peak RSS {baseline['peak_rss_mb']:.0f} MB")
    print(f"ratio:    sdbatch iteration takes {iterate['seconds'] / baseline['seconds']:.1f}x the baseline's time, "
          f"{iterate['peak_rss_mb'] / baseline['peak_rss_mb']:.2f}x its peak memory")


if __name__ == "__main__":
    sys.exit(main())
