"""How well sdbatch-tiny's ControlNets steer it, and what the preprocessors cost on CPU.

    python -m sdbatch.tiny.evaluate_control --n 100 --json sdbatch/tiny/controlnet/evaluation.json
    python -m sdbatch.tiny.evaluate_control --n 100 --kinds pose --json ...   # re-measure one net, keep the rest

Every measure is taken twice: with layout-free prompts (the scene's caption without its
position phrases, "in front of" read as "and": the claim a user cares about, "put the
shapes where the map says" when the prompt does not say where), and with the scenes' own
captions, which already give the layout (how the first release was measured).

- Edge agreement: held-out scenes; the control map is Canny (100/200) of the scene; the
  score is F1 between those edges and Canny of the generated image (1-pixel tolerance),
  with the canny ControlNet at scale 1 and, as the baseline, with the same prompt and
  seed and no ControlNet.
- Depth order: held-out scenes with two overlapping shapes; the control map is the scene's
  depth map (as a depth map made elsewhere) and, separately, the sdbatch-tiny-depth
  estimate of the scene (the full chain); an image is right when
  the pixels where the shapes overlap take the front shape's colour (nearer to it than
  to the back shape's and the background's). Same baseline without control.
- Limb placement: held-out stick figures (scenes.make_figure), prompt "a COLOUR stick
  figure, on a COLOUR background" (it says nothing of the pose), control map the figure's
  OpenPose skeleton; scored from the procedural ground truth: the share of points along
  the 8 arm and leg segments that land on the image's foreground (1-pixel tolerance), the
  share of foreground pixels that lie on the true figure, and their F1.
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

from sdbatch.tiny import controlnet_path, depth_estimator_path, model_path, pose_estimator_path, scenes
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


def held_out_figures(n: int) -> list:
    """n held-out stick figures (seeds no pose net was trained on)."""
    return [scenes.make_figure(EVAL_SEED * 1_000_000 + i) for i in range(n)]


def foreground(image: np.ndarray, threshold: float = 48.0, border: int = 2) -> np.ndarray:
    """Pixels farther than ``threshold`` (RGB distance, 0..255) from the median colour of the image's border.

    (Figures keep 3 pixels inside the image, so the border is background.)

    Colour-blind on purpose: sdbatch-tiny's small VAE shifts the colour of thin strokes (a
    green figure may decode purplish), so a figure is found as what stands out of the
    background. The VAE's own round trip (encode, decode) of 100 held-out figures scores
    limbs 0.81, precision 0.90, F1 0.82: the ceiling for any figure sdbatch-tiny draws.
    """
    pixels = np.asarray(image, float)
    ring = np.ones(pixels.shape[:2], bool)
    ring[border:-border, border:-border] = False
    background = np.median(pixels[ring], axis=0)
    return np.linalg.norm(pixels - background, axis=-1) > threshold


# The arm and leg segments (BODY_18 index pairs): shoulder-elbow-wrist, hip-knee-ankle, each side.
LIMB_SEGMENTS = ((2, 3), (3, 4), (5, 6), (6, 7), (8, 9), (9, 10), (11, 12), (12, 13))


def limb_placement(image: np.ndarray, figure, tolerance: int = 1, points: int = 5) -> dict[str, float]:
    """How well a generated image puts the figure's limbs where the procedural ground truth has them.

    ``limbs``: share of points evenly along the 8 arm and leg segments with a foreground
    pixel within ``tolerance``; ``precision``: share of foreground pixels within
    ``tolerance`` of the true figure; ``f1``: their harmonic mean (a blob covering the
    whole image reaches every limb but not precision).
    """
    from scipy.ndimage import binary_dilation

    drawn = foreground(image)
    near = binary_dilation(drawn, iterations=tolerance) if tolerance else drawn
    kp = figure.keypoints[:, :2]
    along = np.linspace(0, 1, points)
    samples = np.concatenate([kp[a] + along[:, None] * (kp[b] - kp[a]) for a, b in LIMB_SEGMENTS])
    xy = np.clip(np.rint(samples).astype(int), 0, scenes.SIZE - 1)
    limbs = float(near[xy[:, 1], xy[:, 0]].mean())
    truth = binary_dilation(foreground(figure.image), iterations=tolerance)
    precision = float((drawn & truth).sum() / drawn.sum()) if drawn.any() else 0.0
    f1 = 2 * limbs * precision / (limbs + precision) if limbs + precision else 0.0
    return {"limbs": limbs, "precision": precision, "f1": float(f1)}


def _pipelines(model: Path, sampler: str, kinds=("canny", "depth")):
    import diffusers
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(str(model), torch_dtype=torch.float32)
    plain.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(plain.scheduler.config)
    controlled = {}
    for kind in kinds:
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


PROMPTS = ("layout-free", "scene captions")


def _prompt(scene, which: str) -> str:
    return scenes.layout_free_caption(scene.attributes) if which == "layout-free" else scene.caption


def _mean(values) -> float:
    return round(float(np.mean(values)), 3)


def evaluate_canny(plain, net, n: int, settings: dict) -> dict:
    """Edge F1 with the canny ControlNet and without, per prompt kind."""
    from sdbatch_plugins.preprocessors import canny_map

    found = held_out_scenes(n)
    maps = [canny_map(s.pil()) for s in found]
    seeds, report = list(range(n)), {}
    for which in PROMPTS:
        prompts = [_prompt(s, which) for s in found]
        report[which] = {}
        for name, images in (("with control", _generate(net, prompts, seeds, settings, maps)),
                             ("without control", _generate(plain, prompts, seeds, settings))):
            report[which][name] = _mean([edge_f1(np.asarray(m)[..., 0] > 0, np.asarray(canny_map(img))[..., 0] > 0)
                                         for m, img in zip(maps, images)])
    return {"measure": "edge F1 (Canny of the image vs the control map, 1-pixel tolerance)", "n": n, **report}


def evaluate_depth(plain, net, n: int, settings: dict) -> dict:
    """Front-shape accuracy on overlapping pairs, with the true depth map, the tiny estimate and no control."""
    from PIL import Image

    from sdbatch_plugins.preprocessors import depth_map, load_depth_estimator

    estimator = load_depth_estimator(str(depth_estimator_path()))
    found = held_out_scenes(n, two_overlapping=True)
    estimated = [depth_map(estimator, s.pil()) for s in found]
    given = [Image.fromarray(s.depth).convert("RGB") for s in found]
    seeds = list(range(n))
    report = {"measure": "share of images whose overlap shows the front shape's colour", "n": n,
              "depth estimate orders front shape nearer": _mean([scenes.depth_orders_front(d, s)
                                                                 for d, s in zip(estimated, found)])}
    for which in PROMPTS:
        prompts = [_prompt(s, which) for s in found]
        runs = {"with control (scene depth map)": _generate(net, prompts, seeds, settings, given),
                "with control (sdbatch-tiny-depth estimate)": _generate(net, prompts, seeds, settings, estimated),
                "without control": _generate(plain, prompts, seeds, settings)}
        report[which] = {name: _mean([front_wins_overlap(img, s) for img, s in zip(images, found)])
                         for name, images in runs.items()}
    return report


def evaluate_pose(plain, net, n: int, settings: dict) -> dict:
    """Limb placement of stick figures with the pose ControlNet (true skeleton as map) and without."""
    from PIL import Image

    found = held_out_figures(n)
    prompts, seeds = [f.caption for f in found], list(range(n))
    maps = [Image.fromarray(f.pose_map) for f in found]
    report = {"measure": "limb placement vs the procedural ground truth (sdbatch.tiny.evaluate_control."
                         "limb_placement)", "n": n, "prompt": "the figure's caption (no pose words)"}
    runs = {"with control (true skeleton)": maps}
    if pose_estimator_path().is_dir():  # the full offline chain: sdbatch-tiny-pose finds the keypoints
        from sdbatch_plugins.preprocessors import draw_pose, load_pose_estimator, pose_keypoints

        estimator = load_pose_estimator(str(pose_estimator_path()))
        runs["with control (sdbatch-tiny-pose estimate)"] = [
            draw_pose(pose_keypoints(estimator, f.pil(), 0.3), f.pil().size, 0.3) for f in found]
    runs = {name: _generate(net, prompts, seeds, settings, m) for name, m in runs.items()}
    runs["without control"] = _generate(plain, prompts, seeds, settings)
    for name, images in runs.items():
        scores = [limb_placement(img, f) for img, f in zip(images, found)]
        report[name] = {k: _mean([s[k] for s in scores]) for k in ("limbs", "precision", "f1")}
    return report


EVALUATIONS = {"canny": evaluate_canny, "depth": evaluate_depth, "pose": evaluate_pose}


def evaluate(n: int, kinds=tuple(EVALUATIONS), model: Path = model_path(), timing: bool = True) -> dict:
    settings = defaults(model)
    plain, controlled = _pipelines(model, settings["sampler"], kinds)
    report = {"sampler": settings["sampler"], "steps": settings["steps"], "guidance": settings["guidance"]}
    for kind in kinds:
        start = time.time()
        report[kind] = EVALUATIONS[kind](plain, controlled[kind], n, settings)
        report[kind]["seconds"] = round(time.time() - start, 1)
        print(kind, json.dumps(report[kind]), flush=True)
    if timing:
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
    parser.add_argument("--kinds", nargs="+", choices=list(EVALUATIONS), default=list(EVALUATIONS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-timing", action="store_true", help="skip the preprocessor timings")
    parser.add_argument("--json", type=Path, help="written, keeping the measures of kinds not re-measured")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = evaluate(args.n, tuple(args.kinds), timing=not args.no_timing)
    if args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        if all(old.get(k) == report[k] for k in ("sampler", "steps", "guidance")):
            report = {**old, **report}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
