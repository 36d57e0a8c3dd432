"""How much sdbatch-tiny's pictures change with the seed, against its training scenes for the same caption.

    python -m sdbatch.tiny.seed_variety --json sdbatch/tiny/model/seed_variety.json \
        --figure sdbatch/tiny/model/seed-variety.png

For each prompt, `seeds` images (one generator per image, seeded 0..seeds-1) at each
guidance, and as many training scenes drawn for the same caption (scenes.make_single, or
for a prompt without a position, a random position per scene as in the dataset). Measured:

- pixels: mean pairwise distance between the images (mean |a - b| over pixels and
  channels, 0..255);
- centroid: spread of the shape's centre (root mean of the x and y variances, in pixels),
  the shape being the pixels nearer the prompt's shape colour than its background colour;
- size: relative spread of the shape's size (std / mean of the square root of its area);
- adherence: share of images the scene classifier reads as the prompt's colour, shape,
  background (and position, when the prompt names one).

Images use the plain diffusers pipeline at the model's sampler and steps, so the figures
hold for any caller.
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from sdbatch.tiny import model_path, scenes
from sdbatch.tiny.evaluate import defaults, load_pipeline

# The quickstart's attribute sets (jobs/quickstart.yaml), one background each.
PROMPTS = (
    {"shape": "circle", "colour": "red", "size": "large", "position": "centre", "background": "yellow"},
    {"shape": "square", "colour": "blue", "size": "large", "position": "centre", "background": "black"},
    {"shape": "circle", "colour": "green", "size": "large", "position": "centre", "background": "black"},
    {"shape": "square", "colour": "red", "size": "large", "position": "centre", "background": "yellow"},
)


def prompt_text(attrs: dict, position: bool = True) -> str:
    """The caption of a one-shape scene, with or without its position phrase."""
    if position:
        return scenes.single_caption(**attrs)
    return f"a {attrs['size']} {attrs['colour']} {attrs['shape']}, {scenes.background_phrase((attrs['background'],))}"


def data_images(attrs: dict, n: int, position: bool = True, seed: int = 0) -> np.ndarray:
    """n training-distribution scenes for the caption (position drawn at random when the prompt has none)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        where = attrs["position"] if position else scenes.POSITIONS[rng.integers(len(scenes.POSITIONS))]
        out.append(scenes.make_single(attrs["shape"], attrs["colour"], where, attrs["size"], attrs["background"],
                                      seed=seed * 1000 + i).image)
    return np.stack(out)


def shape_geometry(image: np.ndarray, attrs: dict) -> tuple[float, float, float]:
    """Centre x, y and size (sqrt of area, pixels) of the region nearer the shape colour than the background."""
    pixels = np.asarray(image, float)
    colour = np.asarray(scenes.COLOURS[attrs["colour"]], float)
    background = np.asarray(scenes.COLOURS[attrs["background"]], float)
    mask = np.linalg.norm(pixels - colour, axis=-1) < np.linalg.norm(pixels - background, axis=-1)
    if not mask.any():
        return float("nan"), float("nan"), 0.0
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean()), float(np.sqrt(mask.sum()))


def variety(images: np.ndarray, attrs: dict) -> dict[str, float]:
    """Pairwise pixel distance, centroid spread and relative size spread of one prompt's images."""
    pixels = np.mean([np.abs(a.astype(float) - b).mean() for a, b in combinations(images, 2)])
    geometry = np.array([shape_geometry(img, attrs) for img in images])
    centres = geometry[:, :2][np.isfinite(geometry[:, 0])]
    spread = float(np.sqrt(centres.var(axis=0).mean())) if len(centres) > 1 else 0.0
    sizes = geometry[:, 2]
    return {"pixels": round(float(pixels), 2), "centroid_px": round(spread, 2),
            "size_rel": round(float(sizes.std() / sizes.mean()) if sizes.mean() else 0.0, 3)}


def _adherence(images: np.ndarray, attrs: dict, position: bool, model) -> float:
    from sdbatch.tiny import classifier

    pred = classifier.predict(model, images)
    keys = ("colour", "shape", "background") + (("position",) if position else ())
    return float(np.mean([all(pred[k][i] == attrs[k] for k in keys) for i in range(len(images))]))


@torch.no_grad()
def measure(guidances=(1.0, 2.0, 3.0, 5.0), seeds: int = 16, prompts=PROMPTS, model: Path = model_path(),
            keep: tuple | None = None, sampler: str | None = None) -> tuple[dict, dict]:
    """Variety per prompt kind (with / without the position phrase) per guidance, and the data's; images kept for ``keep`` (guidance, kind)."""
    from sdbatch.tiny import classifier

    settings = defaults(model)
    sampler = sampler or settings["sampler"]
    pipe = load_pipeline(model, sampler)
    judge = classifier.load()
    report = {"seeds": seeds, "prompts": [prompt_text(a) for a in prompts], "sampler": sampler,
              "steps": settings["steps"], "default_guidance": settings["guidance"]}
    kept = {}
    for kind, position in (("with position", True), ("without position", False)):
        rows = {"data": [variety(data_images(a, seeds, position), a) for a in prompts]}
        kept[("data", kind)] = [data_images(a, seeds, position) for a in prompts]
        for guidance in guidances:
            found, scores = [], []
            for attrs in prompts:
                images = pipe([prompt_text(attrs, position)] * seeds, num_inference_steps=settings["steps"],
                              guidance_scale=guidance, height=scenes.SIZE, width=scenes.SIZE, output_type="np",
                              generator=[torch.Generator().manual_seed(s) for s in range(seeds)]).images
                images = (images * 255).round().astype(np.uint8)
                found.append(variety(images, attrs))
                scores.append(_adherence(images, attrs, position, judge))
                if keep and (guidance, kind) in keep:
                    kept.setdefault((guidance, kind), []).append(images)
            rows[f"guidance {guidance:g}"] = found
            rows[f"guidance {guidance:g} adherence"] = round(float(np.mean(scores)), 3)
        report[kind] = {name: _average(value) for name, value in rows.items()}
        print(kind, json.dumps(report[kind]), flush=True)
    return report, kept


def _average(rows):
    if not isinstance(rows, list):
        return rows
    return {k: round(float(np.mean([r[k] for r in rows])), 3) for k in rows[0]}


def figure(kept: dict, columns: list[tuple], labels: list[str], path: Path, per_row: int = 8, scale: int = 2) -> None:
    """One band per column set (data, model before, model after) of the first prompt's first ``per_row`` seeds."""
    from PIL import Image, ImageDraw

    bands = []
    for key, label in zip(columns, labels):
        strip = np.concatenate(list(kept[key][0][:per_row]), axis=1)
        strip = np.asarray(Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale),
                                                         Image.Resampling.NEAREST))
        head = Image.new("RGB", (strip.shape[1], 16), (255, 255, 255))
        ImageDraw.Draw(head).text((2, 2), label, fill=(0, 0, 0))
        bands += [np.asarray(head), strip]
    Image.fromarray(np.concatenate(bands, axis=0)).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--sampler", default=None, help="default: the model's (sdbatch.json)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--figure", type=Path, help="PNG: the data, then the model at --before and --after guidance")
    parser.add_argument("--before", type=float, default=5.0)
    parser.add_argument("--after", type=float, default=None)
    parser.add_argument("--kind", default="without position", choices=["with position", "without position"],
                        help="prompt kind shown in the figure")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep = tuple((g, k) for g in (args.before, args.after) if g is not None
                 for k in ("with position", "without position"))
    report, kept = measure(tuple(args.guidance), args.seeds, keep=keep, sampler=args.sampler)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.figure:
        columns = [("data", args.kind), (args.before, args.kind)] + ([(args.after, args.kind)] if args.after else [])
        labels = [f"training scenes: {prompt_text(PROMPTS[0], args.kind == 'with position')}",
                  f"sdbatch-tiny, guidance {args.before:g}, seeds 0-7"]
        labels += [f"sdbatch-tiny, guidance {args.after:g}, seeds 0-7"] if args.after else []
        figure(kept, columns, labels, args.figure)


if __name__ == "__main__":
    main()
