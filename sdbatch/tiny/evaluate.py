"""Prompt adherence of sdbatch-tiny, scored by the scene classifier.

Generates images from random one-shape captions with the plain diffusers
StableDiffusionPipeline at the model's defaults (model/sdbatch.json), asks the classifier
what it sees, and reports the fraction of images whose colour, shape, position, size and
background match the prompt; the same prompts and seeds through the same architecture with
random weights give the baseline.

    python -m sdbatch.tiny.evaluate --n 200 --json out/tiny-eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sdbatch.tiny import classifier, model_path, scenes

ATTRIBUTES = ("colour", "shape", "position", "background", "size")
# A1111 sampler names the evaluation understands -> diffusers scheduler class name.
SAMPLERS = {
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler",
    "DDIM": "DDIMScheduler",
}


def defaults(model: Path) -> dict:
    """The model's recommended settings from its sdbatch.json."""
    return json.loads((Path(model) / "sdbatch.json").read_text())


def prompts_for(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n random one-shape, plain-background attribute sets (the same for every model)."""
    rng = np.random.default_rng(seed)
    return [scenes.sample_single_attributes(rng) for _ in range(n)]


def load_pipeline(model: Path, sampler: str, random_weights: bool = False):
    """The plain diffusers pipeline; with random_weights, every network re-initialised (seed 0)."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(pipe.scheduler.config)
    if random_weights:
        torch.manual_seed(0)
        pipe.unet = type(pipe.unet).from_config(pipe.unet.config)
        pipe.vae = type(pipe.vae).from_config(pipe.vae.config)
        pipe.text_encoder = type(pipe.text_encoder)(pipe.text_encoder.config)
    return pipe


@torch.no_grad()
def generate(pipe, attrs: list[dict[str, str]], steps: int, guidance: float, seed: int = 0, batch: int = 50) -> np.ndarray:
    """uint8 images (n, 64, 64, 3); image i uses its own generator seeded seed*100000+i."""
    out = []
    for start in range(0, len(attrs), batch):
        chunk = attrs[start : start + batch]
        prompts = [scenes.single_caption(**a) for a in chunk]
        gens = [torch.Generator().manual_seed(seed * 100_000 + start + i) for i in range(len(chunk))]
        images = pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            height=scenes.SIZE,
            width=scenes.SIZE,
            output_type="np",
        ).images
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out)


def adherence(images: np.ndarray, attrs: list[dict[str, str]], model=None) -> dict[str, float]:
    """Fraction of images whose classified attribute equals the prompt's, per attribute."""
    model = model or classifier.load()
    pred = classifier.predict(model, images)
    scores = {k: float(np.mean([p == a[k] for p, a in zip(pred[k], attrs)])) for k in ATTRIBUTES}
    scores["all four"] = float(
        np.mean([all(pred[k][i] == a[k] for k in ("colour", "shape", "position", "background")) for i, a in enumerate(attrs)])
    )
    return scores


def evaluate(
    model: Path | None = None,
    n: int = 200,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    sampler: str | None = None,
    baseline: bool = True,
    grid: Path | None = None,
) -> dict:
    """Score the trained model (and the random-weights baseline) on the same n prompts."""
    model = Path(model or model_path())
    d = defaults(model)
    steps, guidance, sampler = steps or d["steps"], guidance or d["guidance"], sampler or d["sampler"]
    attrs = prompts_for(n, seed)
    result = {"n": n, "seed": seed, "sampler": sampler, "steps": steps, "guidance": guidance}
    runs = {"trained": False, "random": True} if baseline else {"trained": False}
    for name, random_weights in runs.items():
        start = time.time()
        images = generate(load_pipeline(model, sampler, random_weights), attrs, steps, guidance, seed)
        result[name] = adherence(images, attrs)
        result[f"{name}_seconds"] = round(time.time() - start, 1)
        if grid is not None and name == "trained":
            save_grid(images[:16], attrs[:16], grid)
    return result


def save_grid(images: np.ndarray, attrs: list[dict[str, str]], path: Path, cols: int = 8, scale: int = 2) -> None:
    """Images in a grid PNG (nearest-neighbour upscaled), with the prompts in a .txt beside it."""
    from PIL import Image

    rows = len(images) // cols
    grid = np.concatenate([np.concatenate(list(images[r * cols : (r + 1) * cols]), 1) for r in range(rows)], 0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST).save(path)
    path.with_suffix(".txt").write_text("\n".join(scenes.single_caption(**a) for a in attrs[: rows * cols]) + "\n")


def markdown(result: dict) -> str:
    """The adherence table: one row per attribute, trained vs random weights."""
    cols = [c for c in ("trained", "random") if c in result]
    lines = ["| attribute | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for k in (*ATTRIBUTES, "all four"):
        lines.append(f"| {k} | " + " | ".join(f"{100 * result[c][k]:.1f}%" for c in cols) + " |")
    lines.append(
        f"\n{result['n']} images, one-shape prompts on plain backgrounds; sampler {result['sampler']}, "
        f"{result['steps']} steps, guidance {result['guidance']}, seed {result['seed']}."
    )
    return "\n".join(lines)


def main() -> None:
    """CLI: print the markdown table; write the JSON when asked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped sdbatch-tiny)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None)
    parser.add_argument("--no-baseline", action="store_true", help="skip the random-weights baseline")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--grid", type=Path, default=None, help="save the first 16 images as a PNG grid (the model card's samples.png)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = evaluate(
        args.model, args.n, args.seed, args.steps, args.guidance, args.sampler, not args.no_baseline, args.grid
    )
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
