"""LoRA switching cost with 1, 10 and 50 LoRAs in one job, on sdbatch-tiny.

    .venv/bin/python bench/bench_loras.py [--counts 1 10 50] [--samples 40]

N LoRA files (the shipped tint LoRA, each copy scaled differently so every file is its own
adapter) are applied in turn by the ``lora`` plugin's ``activate``, as batches with other LoRA
sets do: the first round adds each adapter (diffusers' loader), later rounds only switch
(the ``lora`` plugin's ``switch``), at least ``--samples`` switches per count, each LoRA then
none in turn, so every call changes the active set. The baseline, measured in the same run, is one 4-step render of a 64x64
item without LoRAs; diffusers' own ``set_adapters`` on the same adapters is timed too (it slows
with every adapter loaded, diffusers #11816). Flat means the switch cost with 50 LoRAs loaded is about that with 1.
Switching is measured with every LoRA held; first loads are measured twice, with every LoRA
held (PEFT's load slows with each adapter held) and with the plugin's limit (``MAX_ADAPTERS``
held, the least recently used unloaded), where the last load costs about the first.
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


def first_loads(registry, paths: list) -> list[float]:
    """Seconds of each LoRA's first activation in turn, with the plugin's adapter limit (MAX_ADAPTERS)."""
    from sdbatch_plugins.loras import activate

    model, _ = load_model(registry)
    seconds = []
    for path in paths:
        started = time.perf_counter()
        activate(model, {str(path.resolve()): [1.0, 1.0, path.stem]})
        seconds.append(time.perf_counter() - started)
    return seconds


def measure(registry, folder: Path, count: int, samples: int) -> dict:
    """Loading and switching with every LoRA held (the limit raised to ``count``), then first loads
    with the plugin's limit."""
    import sdbatch_plugins.loras as loras
    from sdbatch_plugins.loras import activate, lora_pipeline

    limit = loras.MAX_ADAPTERS
    loras.MAX_ADAPTERS = max(limit, count)
    model, render_seconds = load_model(registry)
    paths = make_loras(folder, count)
    loads, switches = [], []
    offs = []
    rounds = 1 + -(-samples // count)  # the first round loads; the others only switch
    for round_ in range(rounds):
        for path in paths:  # each LoRA, then none: every call changes the active set
            started = time.perf_counter()
            activate(model, {str(path.resolve()): [1.0, 1.0, path.stem]})
            (loads if round_ == 0 else switches).append(time.perf_counter() - started)
            started = time.perf_counter()
            activate(model, {})
            offs.append(time.perf_counter() - started)
    pipe, names = lora_pipeline(model), list(model.extra["lora_adapters"].values())
    theirs = []
    for name in (names * (1 + 5 // count))[:5]:  # diffusers' set_adapters on the same adapters, for comparison
        started = time.perf_counter()
        pipe.set_adapters([name], adapter_weights=[1.0])
        theirs.append(time.perf_counter() - started)
    loras.MAX_ADAPTERS = limit
    limited = first_loads(registry, paths)
    return {"loras": count, "render_s": render_seconds, "first_load_s": statistics.mean(loads),
            "last_load_s": loads[-1], "limited_first_load_s": statistics.mean(limited),
            "limited_last_load_s": limited[-1], "limit": limit,
            "switch_s": statistics.median(switches), "off_s": statistics.median(offs),
            "diffusers_set_adapters_s": statistics.median(theirs)}


def main() -> None:
    import torch

    from sdbatch.plugins import load_registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--samples", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    registry = load_registry()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.counts:
            folder = Path(tmp) / str(count)
            folder.mkdir()
            rows.append(measure(registry, folder, count, args.samples))
            row = rows[-1]
            print(f"{count:3d} LoRAs: all held: load mean {row['first_load_s']:5.2f} s, last {row['last_load_s']:5.2f} s; "
                  f"at most {row['limit']} held: load mean {row['limited_first_load_s']:5.2f} s, "
                  f"last {row['limited_last_load_s']:5.2f} s; switch {row['switch_s'] * 1000:6.1f} ms "
                  f"({row['switch_s'] / row['render_s']:.4f} of a 4-step render), off {row['off_s'] * 1000:6.1f} ms, "
                  f"diffusers' set_adapters {row['diffusers_set_adapters_s'] * 1000:7.1f} ms",
                  flush=True)
    first, last = rows[0], rows[-1]
    print(json.dumps({"rows": rows, "switch_ratio_last_vs_first": last["switch_s"] / first["switch_s"]}, indent=2))


if __name__ == "__main__":
    main()
