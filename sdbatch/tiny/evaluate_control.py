"""How well sdbatch-tiny's ControlNets steer it, and what the preprocessors cost on CPU.

    python -m sdbatch.tiny.evaluate_control --n 100 --json out/control-eval.json

- Edge agreement: held-out scenes; the control map is Canny (100/200) of the scene; the
  score is F1 between those edges and Canny of the generated image (1-pixel tolerance),
  with the canny ControlNet at scale 1 and, as the baseline, with the same prompt and
  seed and no ControlNet.
- Depth order: held-out scenes with two overlapping shapes; the control map is the scene's
  depth map (as a depth map made elsewhere) and, separately, the sdbatch-tiny-depth
  estimate of the scene (the full chain); an image is right when
  the pixels where the shapes overlap take the front shape's colour (nearer to it than
  to the back shape's and the background's). Same baseline without control.
- Preprocessor times: Canny at 512x512, the tiny DPT at 64x64, and DPT-Hybrid (MiDaS)
  and ViTPose-B architectures at their real input sizes (random weights: timing only).

Generation uses the plain diffusers StableDiffusionControlNetPipeline at the model's
defaults, so the figures also show the ControlNets load without sdbatch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sdbatch.tiny import controlnet_path, depth_estimator_path, model_path, scenes
from sdbatch.tiny.evaluate import SAMPLERS, defaults

EVAL_SEED = 9  # scenes from seeds no model was trained on


def held_out_scenes(n: int, two_overlapping: bool = False) -> list:
    """n held-out scenes (for depth: two shapes that overlap, both visible)."""
    found, i = [], 0
    while len(found) < n:
        scene = scenes.make_scene(EVAL_SEED * 1_000_000 + i)
        i += 1
        if two_overlapping and not (scene.attributes.overlap and (scene.labels == 1).any()):
            continue
        found.append(scene)
    return found


def edge_f1(control: np.ndarray, generated: np.ndarray, tolerance: int = 1) -> float:
    """F1 of two boolean edge maps, each pixel matching within ``tolerance`` pixels."""
    from scipy.ndimage import binary_dilation

    if not control.any() or not generated.any():
        return 0.0
    precision = (generated & binary_dilation(control, iterations=tolerance)).sum() / generated.sum()
    recall = (control & binary_dilation(generated, iterations=tolerance)).sum() / control.sum()
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def front_wins_overlap(image: np.ndarray, scene) -> bool:
    """Whether the overlap of the two shapes shows the front shape's colour in a generated image."""
    back, front = scene.attributes.shapes
    overlap = (scene.labels == 2) & _mask_of(back)
    if not overlap.any():
        raise ValueError("the scene's shapes do not overlap")
    colour = image[overlap].reshape(-1, 3).mean(0)
    candidates = {"front": front.colour, "back": back.colour}
    candidates.update({f"background{k}": c for k, c in enumerate(scene.attributes.background)})
    distances = {k: np.linalg.norm(colour - np.asarray(scenes.COLOURS[c], float)) for k, c in candidates.items()}
    return min(distances, key=distances.get) == "front"


def _mask_of(spec) -> np.ndarray:
    return scenes._shape_mask(spec) > 0.5


def _pipelines(model: Path, sampler: str):
    import diffusers
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(str(model), torch_dtype=torch.float32)
    plain.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(plain.scheduler.config)
    controlled = {}
    for kind in ("canny", "depth"):
        net = ControlNetModel.from_pretrained(str(controlnet_path(kind)), torch_dtype=torch.float32)
        controlled[kind] = StableDiffusionControlNetPipeline(**plain.components, controlnet=net)
    for pipe in [plain, *controlled.values()]:
        pipe.set_progress_bar_config(disable=True)
    return plain, controlled


def _generate(pipe, prompts, seeds, settings, images=None, chunk: int = 25) -> list[np.ndarray]:
    out = []
    for start in range(0, len(prompts), chunk):
        kwargs = {"image": images[start:start + chunk]} if images is not None else {}
        result = pipe(prompts[start:start + chunk], num_inference_steps=settings["steps"],
                      guidance_scale=settings["guidance"], height=64, width=64, output_type="np",
                      generator=[torch.Generator().manual_seed(s) for s in seeds[start:start + chunk]], **kwargs)
        out += [(img * 255).round().astype(np.uint8) for img in result.images]
    return out


def evaluate(n: int, model: Path = model_path()) -> dict:
    from PIL import Image

    from sdbatch_plugins.preprocessors import canny_map, depth_map, load_depth_estimator

    settings = defaults(model)
    plain, controlled = _pipelines(model, settings["sampler"])
    report = {"n": n, "sampler": settings["sampler"], "steps": settings["steps"], "guidance": settings["guidance"]}

    edge_scenes = held_out_scenes(n)
    maps = [canny_map(s.pil()) for s in edge_scenes]
    prompts, seeds = [s.caption for s in edge_scenes], list(range(n))
    for name, images in (("with control", _generate(controlled["canny"], prompts, seeds, settings, maps)),
                         ("without control", _generate(plain, prompts, seeds, settings))):
        scores = [edge_f1(np.asarray(m)[..., 0] > 0, np.asarray(canny_map(img))[..., 0] > 0)
                  for m, img in zip(maps, images)]
        report[f"edge_f1 {name}"] = round(float(np.mean(scores)), 3)

    estimator = load_depth_estimator(str(depth_estimator_path()))
    depth_scenes = held_out_scenes(n, two_overlapping=True)
    estimated = [depth_map(estimator, s.pil()) for s in depth_scenes]
    given = [Image.fromarray(s.depth).convert("RGB") for s in depth_scenes]
    report["depth estimate orders front shape nearer"] = round(
        float(np.mean([scenes.depth_orders_front(d, s) for d, s in zip(estimated, depth_scenes)])), 3)
    prompts = [s.caption for s in depth_scenes]
    for name, images in (("with control (scene depth map)", _generate(controlled["depth"], prompts, seeds, settings,
                                                                      given)),
                         ("with control (sdbatch-tiny-depth estimate)",
                          _generate(controlled["depth"], prompts, seeds, settings, estimated)),
                         ("without control", _generate(plain, prompts, seeds, settings))):
        report[f"depth_order_accuracy {name}"] = round(
            float(np.mean([front_wins_overlap(img, s) for img, s in zip(images, depth_scenes)])), 3)
    report["preprocessor_ms"] = preprocessor_times()
    return report


def _time_ms(fn, repeats: int = 5) -> float:
    fn()  # warm-up (allocations, lazy imports)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return round((time.perf_counter() - start) / repeats * 1000, 1)


def preprocessor_times() -> dict:
    """Milliseconds per image on this CPU (torch's current thread count)."""
    from PIL import Image
    from transformers import DPTConfig, DPTForDepthEstimation, VitPoseConfig, VitPoseForPoseEstimation

    from sdbatch_plugins.preprocessors import canny_map, depth_map, load_depth_estimator

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8))
    tiny = load_depth_estimator(str(depth_estimator_path()))
    scene = scenes.make_scene(0).pil()
    times = {"canny 512x512": _time_ms(lambda: canny_map(photo)),
             "sdbatch-tiny-depth 64x64": _time_ms(lambda: depth_map(tiny, scene))}
    with torch.inference_mode():
        dpt = DPTForDepthEstimation(DPTConfig()).eval()  # ViT-B/16 DPT, MiDaS v3's base size
        pixels = torch.randn(1, 3, 384, 384)
        times["DPT ViT-B/16 (MiDaS v3) 384x384, random weights"] = _time_ms(lambda: dpt(pixel_values=pixels), 2)
        pose = VitPoseForPoseEstimation(VitPoseConfig()).eval()
        crop = torch.randn(1, 3, 256, 192)
        times["ViTPose-B 256x192, random weights"] = _time_ms(lambda: pose(pixel_values=crop), 3)
    times["threads"] = torch.get_num_threads()
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = evaluate(args.n)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
