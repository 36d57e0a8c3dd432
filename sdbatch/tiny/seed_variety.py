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


def parse_single(prompt: str) -> dict:
    """The attributes of a one-shape caption ('a large red circle on the left, on a yellow background')."""
    phrases = {v: k for k, v in scenes._POSITION_PHRASE.items()}
    head, background = prompt.split(", on ")
    words = head.split()
    return {"size": words[1], "colour": words[2], "shape": words[3], "position": phrases[" ".join(words[4:])],
            "background": background.split()[1]}


def seed_drawn(template: str, seeds: int, wildcards: str | None = None) -> list[dict]:
    """The attributes each seed draws from a template under ``prompt_sampling: random`` (sdbatch's own sampler)."""
    from sdbatch.plan import PromptSampler

    sampler = PromptSampler(wildcards)
    return [parse_single(sampler.sample(template, seed)) for seed in range(seeds)]


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
            keep: tuple | None = None, sampler: str | None = None, template: str | None = None,
            wildcards: str | None = None) -> tuple[dict, dict]:
    """Variety per prompt kind (with / without the position phrase) per guidance, and the data's.

    Images are kept for the (guidance, kind) pairs in ``keep`` (for the figure).
    """
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
    if template is not None:
        report["seed draws position and size"] = _drawn(pipe, settings, template, wildcards, seeds, guidances, kept)
        print(json.dumps(report["seed draws position and size"]), flush=True)
    return report, kept


def _drawn(pipe, settings, template: str, wildcards, seeds: int, guidances, kept: dict) -> dict:
    """Variety when each seed draws the position and size from ``template`` (the quickstart), vs the data for it."""
    drawn = seed_drawn(template, seeds, wildcards)
    data = np.stack([scenes.make_single(a["shape"], a["colour"], a["position"], a["size"], a["background"],
                                        seed=i).image for i, a in enumerate(drawn)])
    kept[("data", "drawn")] = [data]
    reference = {**drawn[0], "position": None, "size": None}
    row = {"template": template, "data": variety(data, reference)}
    for guidance in guidances:
        images = pipe([scenes.single_caption(**a) for a in drawn], num_inference_steps=settings["steps"],
                      guidance_scale=guidance, height=scenes.SIZE, width=scenes.SIZE, output_type="np",
                      generator=[torch.Generator().manual_seed(s) for s in range(seeds)]).images
        images = (images * 255).round().astype(np.uint8)
        kept[(guidance, "drawn")] = [images]
        row[f"guidance {guidance:g}"] = variety(images, reference)
    return row


def _average(rows):
    if not isinstance(rows, list):
        return rows
    return {k: round(float(np.mean([r[k] for r in rows])), 3) for k in rows[0]}


def figure(kept: dict, columns: list[tuple], labels: list[str], path: Path, per_row: int = 8, scale: int = 2) -> None:
    """One band per column set (data, model before, model after) of the first prompt's first ``per_row`` seeds."""
    from PIL import Image, ImageDraw

    bands = []
    for key, label in zip(columns, labels):
        gap = np.full((scenes.SIZE, 2, 3), 255, np.uint8)  # a white line between images
        strip = np.concatenate([x for img in kept[key][0][:per_row] for x in (img, gap)][:-1], axis=1)
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
    parser.add_argument("--template", default=None,
                        help="also measure seeds drawing the prompt from this template (prompt_sampling: random)")
    parser.add_argument("--wildcards", default=None, help="wildcard folder for --template")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--figure", type=Path, help="PNG: data and model (at the default guidance) per prompt kind")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = defaults(model_path())["guidance"]
    keep = ((g, "with position"), (g, "without position"))
    report, kept = measure(tuple(args.guidance), args.seeds, keep=keep, sampler=args.sampler,
                           template=args.template, wildcards=args.wildcards)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.figure:
        first = PROMPTS[0]
        bands = [(("data", "with position"), f"training scenes for '{prompt_text(first)}'"),
                 ((g, "with position"), f"sdbatch-tiny, same prompt, guidance {g:g}, seeds 0-7"),
                 (("data", "without position"), f"training scenes for '{prompt_text(first, False)}'"),
                 ((g, "without position"), f"sdbatch-tiny, same prompt, guidance {g:g}, seeds 0-7")]
        if args.template:
            bands += [(("data", "drawn"), f"training scenes, position and size drawn per seed from '{args.template}'"),
                      ((g, "drawn"), f"sdbatch-tiny, prompt_sampling: random, guidance {g:g}, seeds 0-7")]
        figure(kept, [b[0] for b in bands], [b[1] for b in bands], args.figure)


if __name__ == "__main__":
    main()
