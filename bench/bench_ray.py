"""Images/s of the local executor, Ray with 1 and 2 workers, and plain diffusers (batch 1 and batched).

    .venv/bin/python bench/bench_ray.py [--model sdbatch-tiny] [--items 64] [--steps 20]

All runs render the same items into WebDataset shards (the plain loops save PNGs), in one
process after another, model loading included, at batch 4. Ratios are against plain
diffusers called once per item (how most scripts loop) and against plain diffusers given
4 prompts and 4 generators per call (the batched baseline; sdbatch's ratio to it is the
CPU path cost: sdbatch keeps every item's pixels independent of its batch). Ray's scaling
efficiency is (2-worker rate) / (2 x 1-worker rate). The last line streams a
1,000,000-item plan through the driver's batching (no rendering) in a fresh process and
reports its peak memory against a process that only imports sdbatch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import plain_loop  # noqa: E402

STREAM = r"""
import json, resource, sys


def peak_mb():
    # VmHWM starts afresh at exec; ru_maxrss would inherit the parent's high-water mark.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


from sdbatch.job import load_job
from sdbatch.plugins import load_registry
from sdbatch.run import _batches
plan = load_job(sys.argv[1], load_registry()).plan
batches = sum(1 for _ in _batches(plan.items(), 8, lambda item: False)) if sys.argv[2] == "stream" else 0
print(json.dumps({"batches": batches, "peak_mb": peak_mb()}))
"""


def plain_batched(model_dir: str, items: list, out: Path, batch: int) -> float:
    """Plain diffusers, ``batch`` items per call: a list of prompts and one seeded generator per item."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    began = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for start in range(0, len(items), batch):
        group, first = items[start:start + batch], items[start]
        images = pipe([item.prompt for item in group], negative_prompt=[item.negative_prompt for item in group],
                      num_inference_steps=first.steps, guidance_scale=first.guidance, width=first.width,
                      height=first.height, generator=[torch.Generator().manual_seed(item.seed) for item in group]).images
        for offset, image in enumerate(images):
            image.save(out / f"{start + offset}.png")
    return time.perf_counter() - began


def timed_run(job: Path, out: Path, *extra: str) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sdbatch", "run", str(job), "-o", str(out), "-q", *extra], check=True)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdbatch-tiny")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sdbatch-bench-ray-"))
    job = work / "set.yaml"
    job.write_text(f"model: {args.model}\nsteps: {args.steps}\nbatch_size: 4\nsampler: Euler a\nguidance: 7.5\n"
                   "prompt_sampling: random\n"
                   'prompt: "a {small|large} {red|blue|green} {circle|square|triangle}, on a {white|black} background"\n'
                   f"sweep: {{seed: {{start: 0, count: {args.items}}}}}\n"
                   "outputs: [{webdataset: {shard_size: 16}}]\n")
    from sdbatch.job import load_job
    from sdbatch.plugins import load_registry

    plan = load_job(job, load_registry()).plan
    (work / "plain").mkdir()
    (work / "plain4").mkdir()
    model_dir, items = plan.models[args.model].location, list(plan)
    rates = {"plain diffusers b1": args.items / plain_loop(model_dir, items, work / "plain"),
             "plain diffusers b4": args.items / plain_batched(model_dir, items, work / "plain4", 4)}
    rates["sdbatch local"] = args.items / timed_run(job, work / "local")
    for workers in (1, 2):
        rates[f"sdbatch ray x{workers}"] = args.items / timed_run(job, work / f"ray{workers}", "--executor", "ray",
                                                                  "--workers", str(workers))
    base, batched = rates["plain diffusers b1"], rates["plain diffusers b4"]
    print(f"{args.items} items, {args.steps} steps, batch 4, model {args.model}; whole commands incl. start-up")
    print(f"{'':22s} {'images/s':>8s}  {'vs b1':>6s}  {'vs b4':>6s}")
    for name, rate in rates.items():
        print(f"{name:22s} {rate:8.2f}  {rate / base:5.2f}x  {rate / batched:5.2f}x")
    print(f"CPU path ratio (sdbatch local at batch 4 / plain diffusers at batch 4): "
          f"{rates['sdbatch local'] / batched:.2f}")
    efficiency = rates["sdbatch ray x2"] / (2 * rates["sdbatch ray x1"])
    print(f"ray scaling efficiency 1 -> 2 workers: {efficiency:.2f}")

    big = work / "million.yaml"
    big.write_text(f"model: {args.model}\nprompt_sampling: random\n"
                   'prompt: "a {small|large} {red|blue|green} {circle|square|triangle}"\n'
                   "sweep: {seed: {start: 0, count: 1000000}}\n")
    idle = json.loads(subprocess.run([sys.executable, "-c", STREAM, str(big), "idle"], capture_output=True,
                                     text=True, check=True).stdout)
    streamed = json.loads(subprocess.run([sys.executable, "-c", STREAM, str(big), "stream"], capture_output=True,
                                         text=True, check=True).stdout)
    print(f"driver streaming 1,000,000 items into {streamed['batches']:,} batches: peak {streamed['peak_mb']:.0f} MB "
          f"vs {idle['peak_mb']:.0f} MB planned but not streamed ({streamed['peak_mb'] / idle['peak_mb']:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
