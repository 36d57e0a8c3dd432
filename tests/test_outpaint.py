"""Outpainting on sdbatch-tiny: the image kept inside, the new strip painted, pads sweepable."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdbatch.errors import JobError
from sdbatch.job import load_job
from sdbatch.render import Renderer


@pytest.fixture
def scene(tmp_path):
    from sdbatch.tiny import scenes

    path = tmp_path / "scene.png"
    Image.fromarray(scenes.make_scene(3).image[:, :48]).save(path)  # 48 wide: the left 3/4 of a scene
    return path


def test_outpaint_pads_are_sweep_axes_and_need_a_side(write_job, registry, scene):
    job = load_job(write_job(f"""
        width: 64
        height: 64
        conditioners: [text, {{outpaint: {{image: {scene}}}}}]
        sweep:
          outpaint.right: [8, 16]
    """), registry)
    assert [item.conditioners[1].options["right"] for item in job.plan] == [8, 16]
    assert len({item.id for item in job.plan}) == 2
    with pytest.raises(JobError, match="at least one of left, right, top, bottom"):
        load_job(write_job(f"conditioners: [text, {{outpaint: {{image: {scene}}}}}]\n", "none.yaml"), registry)


@pytest.mark.slow
def test_outpaint_keeps_the_image_and_paints_the_new_strip(write_job, registry, scene):
    job = load_job(write_job(f"""
        prompt: "a red circle on the right, on a white background"
        width: 64
        height: 64
        steps: 10
        seed: 1
        conditioners: [text, {{outpaint: {{image: {scene}, right: 16}}}}]
    """), registry)
    (item,) = job.plan
    image = np.asarray(Renderer(registry, "cpu", "float32", job.plan.models).render([item])[0].image).astype(int)
    original = np.asarray(Image.open(scene).convert("RGB")).astype(int)
    assert image.shape == (64, 64, 3)
    assert np.array_equal(image[:, :28], original[:, :28])  # away from the blurred seam: the original, pasted back
    assert np.abs(image[:, :44] - original[:, :44]).mean() < 2
    edge_fill = np.repeat(original[:, -1:], 16, axis=1)
    assert np.abs(image[:, 48:] - edge_fill).mean() > 5  # the strip was painted, not left as the repeated edge
