"""LoRA switching cost with 1, 10 and 50 LoRAs in one job, on sdbatch-tiny.

    .venv/bin/python bench/bench_loras.py [--counts 1 10 50] [--rounds 2]

N LoRA files (the shipped tint LoRA, each copy scaled differently so every file is its own
adapter) are applied in turn by the ``lora`` plugin's ``activate``, as batches with other LoRA
sets do: the first round adds each adapter (diffusers' loader), later rounds only switch
(``set_adapters``). The baseline, measured in the same run, is one 4-step render of a 64x64
item without LoRAs. Flat means the switch cost with 50 LoRAs loaded is about that with 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def make_loras(folder: Path, count: int) -> list[Path]:
    from safetensors.torch import load_file, save_file

    from sdbatch.tiny import lora_path

    tensors = load_file(str(lora_path()))
    paths = []
    for index in range(count):
        path = folder / f"tint{index}.safetensors"
        save_file({k: v * (1 + index / 100) for k, v in tensors.items()}, str(path))
        paths.append(path)
    return paths


def load_model(registry):
    from sdbatch.job import load_job_text
    from sdbatch.render import Renderer

    job = load_job_text('prompt: "a red circle"\nsteps: 4\n', registry)
    renderer = Renderer(registry, "cpu", "float32", job.plan.models)
    item = next(iter(job.plan))
    renderer.render([item])  # warm
    started = time.perf_counter()
    renderer.render([item])
    return renderer.model_for(item), time.perf_counter() - started


def measure(registry, folder: Path, count: int, rounds: int) -> dict:
    from sdbatch_plugins.loras import activate

    model, render_seconds = load_model(registry)
    paths = make_loras(folder, count)
    loads, switches = [], []
    offs = []
    for round_ in range(rounds):
        for path in paths:  # each LoRA, then none: every call changes the active set
            started = time.perf_counter()
            activate(model, {str(path.resolve()): [1.0, 1.0, path.stem]})
            (loads if round_ == 0 else switches).append(time.perf_counter() - started)
            started = time.perf_counter()
            activate(model, {})
            offs.append(time.perf_counter() - started)
    return {"loras": count, "render_s": render_seconds, "first_load_s": statistics.mean(loads),
            "switch_s": statistics.median(switches) if switches else None, "off_s": statistics.median(offs)}


def main() -> None:
    import torch

    from sdbatch.plugins import load_registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    registry = load_registry()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.counts:
            folder = Path(tmp) / str(count)
            folder.mkdir()
            rows.append(measure(registry, folder, count, args.rounds))
            row = rows[-1]
            print(f"{count:3d} LoRAs: load {row['first_load_s'] * 1000:7.1f} ms, switch {row['switch_s'] * 1000:6.1f} ms "
                  f"({row['switch_s'] / row['render_s']:.3f} of a 4-step render), off {row['off_s'] * 1000:6.1f} ms",
                  flush=True)
    first, last = rows[0], rows[-1]
    print(json.dumps({"rows": rows, "switch_ratio_last_vs_first": last["switch_s"] / first["switch_s"]}, indent=2))


if __name__ == "__main__":
    main()
