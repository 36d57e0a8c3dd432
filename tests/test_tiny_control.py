"""Control claims measured on sdbatch-tiny and its shipped ControlNets and depth estimator.

Random weights would let every claim here pass or fail by chance; these use the trained
models through sdbatch itself (job file -> plan -> renderer), on held-out scenes.
Thresholds sit below the figures measured on this CPU (see the closing note of issue 9
and sdbatch/tiny/evaluate_control.py for the larger evaluation).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdbatch.job import load_job
from sdbatch.render import Renderer
from sdbatch.tiny import controlnet_path, depth_estimator_path
from sdbatch.tiny.evaluate_control import edge_f1, front_wins_overlap, held_out_scenes

pytestmark = pytest.mark.skipif(not controlnet_path("canny").is_dir() or not depth_estimator_path().is_dir(),
                                reason="sdbatch-tiny's control models are not built")


class _DepthScene:
    """A scene whose picture is its ground-truth depth map (what a depth ControlNet takes)."""

    def __init__(self, scene):
        self.caption = scene.caption
        self._depth = scene.depth

    def pil(self):
        return Image.fromarray(self._depth).convert("RGB")


def _known_regression(measured: str):
    """Strict xfail for a ControlNet claim the retrained sdbatch-tiny no longer shows (README)."""
    return pytest.mark.xfail(strict=True, reason=(
        "Known regression since sdbatch-tiny learned position from text (session 3): its captions now set "
        f"the layout these ControlNets were trained to add. {measured} "
        "The ControlNets need retraining and a layout-free evaluation."))


def _zipped_job(write_job, scenes, folder, conditioner: str, options: str | None = None,
                axis: str = "scale: [0.0, 1.0]") -> object:
    """One item per scene (its caption as prompt, its image as the conditioner's input) x one swept option.

    ``options`` are the conditioner's other options (default: its sdbatch-tiny ControlNet).
    """
    files = []
    for i, scene in enumerate(scenes):
        path = folder / f"scene{i:02d}.png"
        scene.pil().save(path)
        files.append(str(path))
    prompts = "".join(f'\n    - "{s.caption}"' for s in scenes)
    images = "".join(f"\n    - {f}" for f in files)
    options = f", controlnet: sdbatch-tiny-{conditioner}" if options is None else options
    return write_job(f"""
seed: 5
conditioners:
  - text
  - {conditioner}: {{image: {files[0]}{options}}}
sweep:
  {conditioner}.{axis}
  prompt:{prompts}
  {conditioner}.image:{images}
zip: [[prompt, {conditioner}.image]]
""")


def _images(registry, path):
    """Every item of the job, rendered in one batch per batch key (img2img strengths differ)."""
    job = load_job(path, registry)
    renderer = Renderer(registry, "cpu", "float32", job.plan.models)
    items, images = list(job.plan), {}
    for key in dict.fromkeys(item.batch_key() for item in items):
        batch = [item for item in items if item.batch_key() == key]
        images.update({r.item.id: np.asarray(r.image) for r in renderer.render(batch)})
    return items, [images[item.id] for item in items]


def test_the_tiny_depth_estimator_finds_the_shape_in_front_of_the_background():
    """Measured: 100% of 100 held-out one-shape scenes, correlation 0.86 with the true map.

    (Which of two overlapping shapes is in front it does not get: 52.5%, chance.)
    """
    from sdbatch.tiny import scenes
    from sdbatch_plugins.preprocessors import depth_map, load_depth_estimator

    estimator = load_depth_estimator(str(depth_estimator_path()))
    singles = [s for s in (scenes.make_scene(7_000_000 + i) for i in range(60)) if len(s.attributes.shapes) == 1]
    maps = [np.asarray(depth_map(estimator, s.pil()))[..., 0].astype(float) for s in singles]
    assert np.mean([scenes.depth_orders_front(d, s) for d, s in zip(maps, singles)]) >= 0.95
    assert np.mean([np.corrcoef(d.ravel(), s.depth.ravel())[0, 1] for d, s in zip(maps, singles)]) >= 0.7


@pytest.mark.slow
@_known_regression("Measured on 8 scenes: F1 0.54 with control vs 0.50 without. With an empty prompt "
                   "the net still steers (0.21 vs 0.11 on 16).")
def test_canny_control_makes_the_picture_follow_the_edges(write_job, registry, tmp_path):
    from sdbatch_plugins.preprocessors import canny_map

    scenes = held_out_scenes(8)
    items, images = _images(registry, _zipped_job(write_job, scenes, tmp_path, "canny"))
    f1 = {0.0: [], 1.0: []}
    for item, image in zip(items, images):
        control = np.asarray(canny_map(Image.open(item.axes["canny.image"])))[..., 0] > 0
        f1[item.axes["canny.scale"]].append(edge_f1(control, np.asarray(canny_map(Image.fromarray(image)))[..., 0] > 0))
    # Measured: F1 0.43 with control, 0.22 without (0.41 / 0.20 over 100 scenes in evaluate_control).
    assert np.mean(f1[1.0]) > np.mean(f1[0.0]) + 0.12, f1


@pytest.mark.slow
@_known_regression("Measured on 16 scenes: front shape right in 50% with control vs 37.5% without.")
def test_depth_control_puts_the_front_shape_in_front(write_job, registry, tmp_path):
    """The depth ControlNet, given each scene's depth map as a map (the `image` conditioner)."""
    scenes = held_out_scenes(16, two_overlapping=True)
    maps = [_DepthScene(s) for s in scenes]
    items, images = _images(registry, _zipped_job(write_job, maps, tmp_path, "image",
                                                  ", controlnet: sdbatch-tiny-depth"))
    by_file = {f"scene{i:02d}.png": s for i, s in enumerate(scenes)}
    right = {0.0: [], 1.0: []}
    for item, image in zip(items, images):
        scene = by_file[item.axes["image.image"].rsplit("/", 1)[1]]
        right[item.axes["image.scale"]].append(front_wins_overlap(image, scene))
    # Measured: 56% with control, 31% without (57% / 31% over 100 scenes in evaluate_control).
    assert np.mean(right[1.0]) >= np.mean(right[0.0]) + 0.15, right


@pytest.mark.slow
def test_img2img_strength_decides_how_much_of_the_input_survives(write_job, registry, tmp_path):
    """Measured on 8 held-out scenes with their own captions: edge F1 to the input 0.64 / 0.34 / 0.23
    and mean pixel change 10.6 / 25.6 / 29.0 at strengths 0.3 / 0.6 / 0.9."""
    from sdbatch_plugins.preprocessors import canny_map

    scenes = held_out_scenes(8)
    path = _zipped_job(write_job, scenes, tmp_path, "img2img", options="", axis="strength: [0.3, 0.6, 0.9]")
    items, images = _images(registry, path)
    f1, change = {}, {}
    for item, image in zip(items, images):
        source = np.asarray(Image.open(item.axes["img2img.image"]).convert("RGB"))
        strength = item.axes["img2img.strength"]
        f1.setdefault(strength, []).append(edge_f1(np.asarray(canny_map(Image.fromarray(source)))[..., 0] > 0,
                                                   np.asarray(canny_map(Image.fromarray(image)))[..., 0] > 0))
        change.setdefault(strength, []).append(np.abs(image.astype(int) - source).mean())
    f1 = [np.mean(f1[s]) for s in (0.3, 0.6, 0.9)]
    change = [np.mean(change[s]) for s in (0.3, 0.6, 0.9)]
    assert f1[0] > 0.5 and f1[0] > f1[1] > f1[2], f1
    assert change[0] < 15 and change[0] < change[1] < change[2], change
