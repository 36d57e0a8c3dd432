"""sdbatch against each family's diffusers pipeline, at batch 1 and batched, in one run.

    .venv/bin/python bench/bench_families.py [--items 8] [--batch 8] [--steps 8] [--threads 1]

For sdbatch-tiny (SD 1.x) and tiny random SDXL, SD3 and FLUX.1 models (built offline), it
renders the same items (prompts, seeds, steps, guidance, sampler) with sdbatch's Renderer and
with the family's diffusers pipeline (a list of prompts and one generator per item, as a
careful hand-written loop does), and prints seconds and the speed ratio sdbatch/diffusers
(above 1.0: sdbatch is faster), in wall-clock and in CPU time (on a shared machine CPU time
is the steadier one). Models load before timing; the sides alternate ``--repeat`` times and
each keeps its best. Figures depend on the machine: compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

PIPELINES = {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
SAMPLERS = {"sd1": "DPM++ 2M", "sdxl": "Euler", "sd3": "Flow Euler", "flux": "Flow Euler"}


def _models(folder: Path) -> dict:
    from sdbatch.testfamilies import BUILDERS
    from sdbatch.tiny import model_path

    models = {"sd1": model_path()}
    for family, build in BUILDERS.items():
        models[family] = build(folder / family)
    return models


def _best(function, repeat: int) -> tuple[float, float]:
    """The best wall-clock and the best CPU time (this process) of ``repeat`` runs."""
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def bench_family(family: str, folder: Path, args) -> dict:
    import diffusers
    import torch

    from sdbatch.job import load_job_text
    from sdbatch.plugins import load_registry
    from sdbatch.render import Renderer

    registry = load_registry()
    negative = "" if family == "flux" else 'negative_prompt: "blurry"'
    job = load_job_text(f"""
model: {folder}
prompt: "a red circle on blue background"
{negative}
sampler: "{SAMPLERS[family]}"
steps: {args.steps}
width: 64
height: 64
sweep:
  seed: {{start: 1, count: {args.items}}}
""", registry)
    items = list(job.plan)
    renderer = Renderer(registry, "cpu", "float32", job.plan.models)
    renderer.render(items[:1])  # load and warm up

    def ours(batch: int):
        for start in range(0, len(items), batch):
            renderer.render(items[start:start + batch])

    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(str(folder), local_files_only=True,
                                                                  torch_dtype=torch.float32)
    pipe.scheduler = registry.require("sampler", SAMPLERS[family]).obj.create(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if family == "sd1":
        pipe.safety_checker = None

    def theirs(batch: int):
        for start in range(0, len(items), batch):
            rows = items[start:start + batch]
            kwargs = {} if family == "flux" else {"negative_prompt": ["blurry"] * len(rows)}
            pipe([i.prompt for i in rows], num_inference_steps=args.steps, guidance_scale=rows[0].guidance,
                 height=64, width=64, generator=[torch.Generator().manual_seed(i.seed) for i in rows],
                 output_type="np", **kwargs)

    theirs(1)  # warm up
    result = {}
    for batch in (1, args.batch):
        mine, pipeline = [], []
        for _ in range(args.repeat):  # alternate the sides, so a busy moment on the machine hits both
            mine.append(_best(lambda: ours(batch), 1))
            pipeline.append(_best(lambda: theirs(batch), 1))
        result[batch] = [min(times) for times in zip(*mine)], [min(times) for times in zip(*pipeline)]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--families", default="sd1,sdxl,sd3,flux")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as temp:
        models = _models(Path(temp))
        print(f"{args.items} items, {args.steps} steps, 64x64, {args.threads} thread(s); best of {args.repeat}, "
              "seconds wall / CPU (sdbatch, diffusers)")
        print(f"{'family':8} {'batch':>5} {'sdbatch':>11} {'diffusers':>11} {'ratio wall':>10} {'ratio CPU':>9}")
        for family in args.families.split(","):
            for batch, (ours, theirs) in bench_family(family, models[family], args).items():
                print(f"{family:8} {batch:>5} {ours[0]:5.2f}/{ours[1]:5.2f} {theirs[0]:5.2f}/{theirs[1]:5.2f} "
                      f"{theirs[0] / ours[0]:9.2f}x {theirs[1] / ours[1]:8.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
