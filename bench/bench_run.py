"""Images/s of `sdbatch run` against plain diffusers at batch 1 and batched, same model and items.

    .venv/bin/python bench/bench_run.py [--model sdbatch-tiny] [--items 32] [--steps 20] [--batch 8] [--rounds 2]

Every side includes model loading and writing PNGs, runs in this process, and uses the same
prompts, seeds, sampler (Euler a), steps, guidance and size. The baselines are
`StableDiffusionPipeline.__call__` once per item with a seeded CPU generator (how most
scripts loop), and the pipeline given a list of `--batch` prompts with one generator per
item (how a batched script calls it). sdbatch runs at batch 1 and `--batch`, and at `--batch`
with `batch_invariant: false` (PyTorch's default CPU kernels, as diffusers runs). The sides
alternate for `--rounds` rounds and each keeps its best time, wall clock and this process's
CPU time (on a shared machine CPU time is the steadier one). Then the ratios print:
`sdbatch b1 / diffusers b1`, `sdbatch bN / diffusers bN` (the CPU path ratio: sdbatch's
kernels that keep pixels independent of the batch against diffusers' own), and what the
guarantee costs, `sdbatch bN / sdbatch bN batch_invariant: false`. Ratios > 1: the first is faster.
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


def _pipeline(model_dir: str):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    from diffusers.utils import logging

    logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_diffusers(model_dir: str, items: list, out: Path, batch_size: int) -> float:
    """Seconds for the pipeline to render and save ``items``, ``batch_size`` prompts per call."""
    import torch

    began = time.perf_counter()
    pipe = _pipeline(model_dir)
    first = items[0]
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = pipe([item.prompt for item in chunk], negative_prompt=[item.negative_prompt for item in chunk],
                      num_inference_steps=first.steps, guidance_scale=first.guidance, width=first.width,
                      height=first.height, generator=[torch.Generator().manual_seed(item.seed) for item in chunk]).images
        for offset, image in enumerate(images):
            image.save(out / f"{start + offset}.png")
    return time.perf_counter() - began


def sdbatch_run(job_path: Path, out: Path, batch_size: int) -> float:
    """Seconds for `sdbatch run` of ``job_path`` in this process, model loading included."""
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
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="the batched sides' batch size")
    parser.add_argument("--rounds", type=int, default=2, help="alternate all sides this often; best time counts")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from sdbatch.job import load_job
    from sdbatch.plugins import load_registry

    work = Path(tempfile.mkdtemp(prefix="sdbatch-bench-"))
    job_path, fast_path = work / "bench.yaml", work / "bench-fast.yaml"
    prompts = "\n".join(f'    - "{p}"' for p in PROMPTS)
    job_path.write_text(f"model: {args.model}\nsampler: Euler a\nsteps: {args.steps}\nguidance: 7.5\n"
                        f"negative_prompt: blurry\nthreads: {args.threads}\n"
                        f"sweep:\n  prompt:\n{prompts}\n  seed: {{start: 1, count: {args.items // len(PROMPTS)}}}\n")
    fast_path.write_text(job_path.read_text() + "batch_invariant: false\n")
    job = load_job(job_path, load_registry())
    items = list(job.plan)
    model_dir = job.plan.models[args.model].location
    first = items[0]
    print(f"model {args.model} ({model_dir}), {len(items)} items, {first.width}x{first.height}, "
          f"{args.steps} steps, Euler a, CFG 7.5, torch threads {args.threads}, {torch.__version__}")

    n = args.batch
    fast = f"sdbatch b{n} batch_invariant: false"
    sides = {"diffusers b1": lambda out: plain_diffusers(model_dir, items, out, 1),
             f"diffusers b{n}": lambda out: plain_diffusers(model_dir, items, out, n),
             "sdbatch b1": lambda out: sdbatch_run(job_path, out, 1),
             f"sdbatch b{n}": lambda out: sdbatch_run(job_path, out, n),
             fast: lambda out: sdbatch_run(fast_path, out, n)}
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for round_ in range(args.rounds):
        for number, (name, side) in enumerate(sides.items() if round_ % 2 == 0 else reversed(sides.items())):
            out = work / f"{round_}-{number}"
            out.mkdir()
            began = time.process_time()
            wall[name] = min(wall.get(name, float("inf")), side(out))
            cpu[name] = min(cpu.get(name, float("inf")), time.process_time() - began)
    print(f"{'':32s} {'images/s':>9s} {'CPU s/image':>12s}")
    for name in sides:
        print(f"{name:32s} {len(items) / wall[name]:9.2f} {cpu[name] / len(items):12.3f}")
    for a, b in (("sdbatch b1", "diffusers b1"), (f"sdbatch b{n}", f"diffusers b{n}"), (f"sdbatch b{n}", fast),
                 (fast, f"diffusers b{n}")):
        print(f"{a} / {b}: {wall[b] / wall[a]:.2f}x wall, {cpu[b] / cpu[a]:.2f}x CPU")
    print(f"outputs in {work}")


if __name__ == "__main__":
    sys.exit(main())
