"""ControlNet conditioners, img2img and inpainting on the tiny random model: plumbing and determinism.

What control and img2img do to the picture is measured on sdbatch-tiny in
tests/test_tiny_control.py; these tests check the machinery: per-row scales, several
nets, batch independence, the preprocessor cache, folders as axes and the error cases.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdbatch.cli import main
from sdbatch.errors import JobError
from sdbatch.job import load_job
from sdbatch.render import Renderer


@pytest.fixture(scope="session")
def tiny_controlnet(tiny_model, tmp_path_factory):
    from sdbatch.testmodel import build_tiny_controlnet

    return build_tiny_controlnet(tiny_model, tmp_path_factory.mktemp("controlnet") / "cn", seed=1)


@pytest.fixture
def inputs(tmp_path):
    """Three procedural scenes as PNGs in a folder, and a mask."""
    from sdbatch.tiny import scenes

    folder = tmp_path / "scenes"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(scenes.make_scene(i).image).save(folder / f"scene{i}.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return folder


def _job(write_job, tiny_model, body: str, name: str = "job.yaml"):
    head = f"model: {tiny_model}\nprompt: a red circle\nseed: 3\nsteps: 4\nguidance: 5\nsampler: Euler a\n"
    return write_job(head + body, name)


def _render(registry, job, items=None, batch=None):
    renderer = Renderer(registry, "cpu", "float32", job.plan.models)
    items = list(job.plan) if items is None else items
    if batch is None:
        return [np.asarray(r.image) for r in renderer.render(items)]
    out = []
    for start in range(0, len(items), batch):
        out += [np.asarray(r.image) for r in renderer.render(items[start:start + batch])]
    return out


def test_control_scale_zero_is_the_plain_render_and_rows_are_batch_independent(
        write_job, tiny_model, tiny_controlnet, inputs, registry):
    job = load_job(_job(write_job, tiny_model, f"""
conditioners:
  - text
  - image: {{image: {inputs / 'scene0.png'}, controlnet: {tiny_controlnet}}}
sweep: {{image.scale: [0.0, 0.5, 1.0]}}
"""), registry)
    plain = load_job(_job(write_job, tiny_model, "", "plain.yaml"), registry)
    together = _render(registry, job)
    alone = _render(registry, job, batch=1)
    assert all(np.array_equal(a, b) for a, b in zip(together, alone))  # batch composition changes nothing
    assert np.array_equal(together[0], _render(registry, plain)[0])  # scale 0 adds exactly nothing
    assert not np.array_equal(together[1], together[0]) and not np.array_equal(together[2], together[1])


def test_several_controlnets_add_up_deterministically(write_job, tiny_model, tiny_controlnet, inputs, registry):
    body = f"""
conditioners:
  - text
  - image: {{image: {inputs / 'scene0.png'}, controlnet: {tiny_controlnet}, scale: 0.8}}
  - canny: {{image: {inputs / 'scene1.png'}, controlnet: {tiny_controlnet}, scale: 0.6, start: 0.25, end: 0.75}}
"""
    both = load_job(_job(write_job, tiny_model, body), registry)
    first = load_job(_job(write_job, tiny_model, body.rsplit("  - canny", 1)[0], "one.yaml"), registry)
    a, b = _render(registry, both), _render(registry, both)
    assert np.array_equal(a[0], b[0])
    assert not np.array_equal(a[0], _render(registry, first)[0])


def test_items_that_sweep_the_controlnet_never_share_a_batch(write_job, tiny_model, tiny_controlnet, inputs,
                                                             registry, tmp_path):
    import shutil

    other = shutil.copytree(tiny_controlnet, tmp_path / "other-cn")
    job = load_job(_job(write_job, tiny_model, f"""
conditioners: [text, {{image: {{image: {inputs / 'scene0.png'}, controlnet: {tiny_controlnet}}}}}]
sweep: {{image.controlnet: [{tiny_controlnet}, {other}], image.scale: [0.5, 1.0]}}
"""), registry)
    keys = [item.batch_key() for item in job.plan]
    assert keys[0] == keys[1] and keys[0] != keys[2] and keys[2] == keys[3]  # scale batches, the net does not


def test_a_folder_is_one_item_per_image_and_ids_follow_content(write_job, tiny_model, tiny_controlnet, inputs,
                                                               registry):
    body = f"conditioners:\n  - text\n  - canny: {{image: {inputs}, controlnet: {tiny_controlnet}}}\n"
    job = load_job(_job(write_job, tiny_model, body), registry)
    items = list(job.plan)
    assert [item.axes["canny.image"].rsplit("/", 1)[1] for item in items] == ["scene0.png", "scene1.png", "scene2.png"]
    before = items[1].id
    Image.new("RGB", (64, 64), "white").save(inputs / "scene1.png")
    after = load_job(_job(write_job, tiny_model, body), registry).plan.item_at(1).id
    assert after != before and load_job(_job(write_job, tiny_model, body), registry).plan.item_at(0).id == items[0].id


def test_preprocessed_maps_are_cached_and_saved_once(write_job, tiny_model, tiny_controlnet, inputs, registry,
                                                     tmp_path, monkeypatch):
    from sdbatch_plugins import control

    calls = []
    original = control.CannyConditioner.preprocess
    monkeypatch.setattr(control.CannyConditioner, "preprocess",
                        lambda self, *a: calls.append(1) or original(self, *a))
    control._MAPS.clear()
    path = _job(write_job, tiny_model, f"""
conditioners:
  - text
  - canny: {{image: {inputs / 'scene1.png'}, controlnet: {tiny_controlnet}}}
sweep: {{seed: [1, 2, 3], canny.scale: [0.5, 1.0]}}
outputs: [png, control_maps]
""")
    assert main(["run", str(path), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert len(calls) == 1  # six items, one input: one Canny
    saved = list((tmp_path / "out" / "control").glob("*.png"))
    assert len(saved) == 1
    edges = np.asarray(Image.open(saved[0]))
    assert edges.shape == (64, 64, 3) and 0 < (edges > 0).mean() < 0.5


def test_img2img_and_inpaint_render_deterministically_and_inpaint_keeps_the_unmasked_area(
        write_job, tiny_model, inputs, registry, tmp_path):
    image = inputs / "scene0.png"
    img2img = load_job(_job(write_job, tiny_model, f"""
conditioners: [text, {{img2img: {{image: {image}}}}}]
sweep: {{img2img.strength: [0.5, 1.0]}}
"""), registry)
    items = list(img2img.plan)
    assert items[0].batch_key() != items[1].batch_key()  # strength decides the timesteps: never one batch
    a, b = _render(registry, img2img, batch=1), _render(registry, img2img, batch=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not np.array_equal(a[0], a[1])

    inpaint = load_job(_job(write_job, tiny_model, f"""
conditioners: [text, {{inpaint: {{image: {image}, mask: {tmp_path / 'mask.png'}, mask_blur: 0}}}}]
""", "inpaint.yaml"), registry)
    out = _render(registry, inpaint)[0]
    original = np.asarray(Image.open(image).convert("RGB"))
    outside = np.ones((64, 64), bool)
    outside[16:48, 16:48] = False
    assert np.array_equal(out[outside], original[outside])
    assert np.abs(out[~outside].astype(int) - original[~outside]).mean() > 5


def test_control_in_an_animation_takes_one_image_per_frame(write_job, tiny_model, tiny_controlnet, inputs,
                                                           registry):
    job = load_job(_job(write_job, tiny_model, f"""
conditioners: [text, {{image: {{image: {inputs}, controlnet: {tiny_controlnet}}}}}]
animation:
  keyframes: {{0: {{prompt: a red circle}}, 2: {{prompt: a blue square}}}}
"""), registry)
    assert len(job.plan) == 3
    assert [sorted(i.extra["inputs"])[0].rsplit("/", 1)[1] for i in job.plan] == ["scene0.png", "scene1.png",
                                                                                   "scene2.png"]
    short = _job(write_job, tiny_model, f"""
conditioners: [text, {{image: {{image: {inputs}, controlnet: {tiny_controlnet}}}}}]
animation:
  keyframes: {{0: {{prompt: a}}, 5: {{prompt: b}}}}
""", "short.yaml")
    with pytest.raises(JobError, match="has 3 images; the animation's 6 frames need one each"):
        load_job(short, registry)


def test_validation_errors_name_the_line(write_job, tiny_model, tiny_controlnet, inputs, registry, tmp_path):
    wrong = tmp_path / "wrong-cn"
    wrong.mkdir()
    config = json.loads((tiny_controlnet / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 1024}))
    (tmp_path / "empty").mkdir()
    path = _job(write_job, tiny_model, f"""
conditioners:
  - text
  - canny: {{image: missing.png, controlnet: {tiny_controlnet}}}
  - depth: {{image: {inputs / 'scene0.png'}, controlnet: {wrong}}}
  - image: {{image: {tmp_path / 'empty'}, controlnet: {tiny_controlnet}, start: 0.6, end: 0.4}}
  - inpaint: {{image: {inputs / 'scene0.png'}}}
  - canny: {{controlnet: {tiny_controlnet}, scael: 1}}
""")
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    text = str(error.value)
    for expected in [":10:", "conditioners[1].canny.image: image file or folder not found: missing.png",
                     "conditioners[2].depth: ControlNet", "cross-attention size 1024 vs",
                     "a ControlNet for another SD version?", "no images (.png",
                     "end (0.4) must be after start (0.6)", "inpaint needs a mask",
                     "missing required key 'image'", "did you mean 'scale'?"]:
        assert expected in text, expected


def test_bad_inputs_fail_their_items_and_the_run_goes_on(write_job, tiny_model, tiny_controlnet, inputs, tmp_path):
    (inputs / "zz-broken.png").write_bytes(b"not a png")
    Image.new("RGB", (96, 64)).save(inputs / "zz-wide.png")
    path = _job(write_job, tiny_model, f"""
retries: 0
conditioners: [text, {{image: {{image: {inputs}, controlnet: {tiny_controlnet}, resize: none}}}}]
""")
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out), "-q"]) != 0  # failures make the exit code non-zero
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    errors = " ".join(f["error"] for f in failures)
    assert len(failures) == 2
    assert "cannot read image" in errors and "zz-broken.png" in errors
    assert "is 96x64 but the item is 64x64; resize: none needs equal sizes" in errors
    assert len(list(out.rglob("*.png"))) == 3  # the three good scenes rendered


def test_img2img_combines_with_controlnet(write_job, tiny_model, tiny_controlnet, inputs, registry):
    job = load_job(_job(write_job, tiny_model, f"""
conditioners:
  - text
  - image: {{image: {inputs / 'scene1.png'}, controlnet: {tiny_controlnet}}}
  - img2img: {{image: {inputs / 'scene0.png'}, strength: 0.6}}
sweep: {{image.scale: [0.0, 1.0]}}
"""), registry)
    alone, together = _render(registry, job, batch=1), _render(registry, job)
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))
    assert not np.array_equal(together[0], together[1])


def test_a_pose_model_that_finds_no_person_fails_the_item_with_a_message(write_job, tiny_model, tiny_controlnet,
                                                                        inputs, tmp_path):
    from sdbatch_plugins.preprocessors import make_tiny_vitpose

    pose_model = make_tiny_vitpose(tmp_path / "vitpose")
    path = _job(write_job, tiny_model, f"""
retries: 0
conditioners:
  - text
  - pose: {{image: {inputs / 'scene0.png'}, controlnet: {tiny_controlnet}, estimator: {pose_model}, threshold: 1.0}}
""")
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out), "-q"]) != 0
    failure = json.loads((out / "failures.jsonl").read_text().splitlines()[0])
    assert "no person" in failure["error"].lower() and "threshold" in failure["error"]


def test_a_missing_controlnet_or_estimator_is_a_validation_error(write_job, tiny_model, inputs, registry):
    path = _job(write_job, tiny_model, f"""
conditioners:
  - text
  - depth: {{image: {inputs / 'scene0.png'}, controlnet: ./no-such-net, estimator: ./no-such-dpt}}
""")
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    text = str(error.value)
    assert "ControlNet not found: ./no-such-net" in text and "depth estimator not found: ./no-such-dpt" in text
