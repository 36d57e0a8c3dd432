"""Images/s of `sdbatch run` against a plain diffusers pipeline loop, same model and items.

    .venv/bin/python bench/bench_run.py [--model sdbatch-tiny] [--items 48] [--steps 20]

Both sides include model loading and writing PNGs, run in this process one after the
other, and use the same prompts, seeds, sampler, steps, guidance and size. The baseline is
`StableDiffusionPipeline.__call__` once per item with a seeded CPU generator (how most
scripts loop); sdbatch runs at batch sizes 1, 4 and 8. Ratios > 1 mean sdbatch is faster.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["a large red circle in the centre, on a yellow background",
           "a small blue square on the left, on a black background",
           "a large green triangle at the top, on a white background",
           "a small purple circle on the right, on an orange background"]


def plain_loop(model_dir: str, items: list, out: Path) -> float:
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    began = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for i, item in enumerate(items):
        image = pipe(item.prompt, negative_prompt=item.negative_prompt or None, num_inference_steps=item.steps,
                     guidance_scale=item.guidance, width=item.width, height=item.height,
                     generator=torch.Generator().manual_seed(item.seed)).images[0]
        image.save(out / f"{i}.png")
    return time.perf_counter() - began


def sdbatch_run(job_path: Path, out: Path, batch_size: int) -> float:
    from sdbatch.job import load_job
    from sdbatch.plugins import load_registry
    from sdbatch.run import LocalExecutor

    began = time.perf_counter()
    registry = load_registry()
    job = load_job(job_path, registry)
    LocalExecutor(job, registry, out, batch_size=batch_size, quiet=True).run()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdbatch-tiny")
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from sdbatch.job import load_job
    from sdbatch.plugins import load_registry

    work = Path(tempfile.mkdtemp(prefix="sdbatch-bench-"))
    seeds = args.items // len(PROMPTS)
    job_path = work / "bench.yaml"
    prompts = "\n".join(f'    - "{p}"' for p in PROMPTS)
    job_path.write_text(f"model: {args.model}\nsampler: Euler a\nsteps: {args.steps}\nguidance: 7.5\n"
                        f"sweep:\n  prompt:\n{prompts}\n  seed: {{start: 1, count: {seeds}}}\n")
    job = load_job(job_path, load_registry())
    items = list(job.plan)
    model_dir = job.plan.models[args.model].location
    first = items[0]
    print(f"model {args.model} ({model_dir}), {len(items)} items, {first.width}x{first.height}, "
          f"{args.steps} steps, Euler a, CFG 7.5, torch threads {args.threads}, {torch.__version__}")

    (work / "plain").mkdir()
    baseline = plain_loop(model_dir, items, work / "plain")
    base_rate = len(items) / baseline
    print(f"{'plain diffusers loop':24s} {base_rate:7.2f} images/s  1.00x  ({baseline:.1f}s)")
    for batch_size in (1, 4, 8):
        seconds = sdbatch_run(job_path, work / f"sdbatch-b{batch_size}", batch_size)
        rate = len(items) / seconds
        print(f"{'sdbatch batch ' + str(batch_size):24s} {rate:7.2f} images/s  {rate / base_rate:.2f}x  ({seconds:.1f}s)")
    print(f"outputs in {work}")


if __name__ == "__main__":
    sys.exit(main())
