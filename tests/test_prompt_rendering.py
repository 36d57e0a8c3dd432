"""A1111 prompt syntax through sdbatch's renderer, on the shipped sdbatch-tiny."""

from __future__ import annotations

import numpy as np
import pytest

from sdbatch.job import load_job
from sdbatch.render import Renderer

pytestmark = pytest.mark.slow

FILLER = ", ".join(["a small circle on white background"] * 14)  # about 100 tokens


def _render(write_job, registry, prompts, batch: bool, extra: str = ""):
    job = load_job(write_job(f"""
        prompt: "x"
        seed: 3
        sweep:
          prompt: {prompts!r}
        {extra}
    """), registry)
    items = list(job.plan)
    renderer = Renderer(registry, "cpu", "float32", job.plan.models)
    results = renderer.render(items) if batch else [renderer.render([i])[0] for i in items]
    return [np.asarray(r.image).astype(int) for r in results]


def _mean_rgb(image):
    return image.reshape(-1, 3).mean(axis=0)


def test_late_words_of_a_long_prompt_change_the_picture(write_job, registry):
    red, blue = _render(write_job, registry, [f"{FILLER}, red", f"{FILLER}, blue"], batch=False)
    assert np.abs(red - blue).mean() > 2.0  # cut at 77 tokens, both prompts were the same picture


def test_rows_of_other_prompt_lengths_render_as_they_would_alone(write_job, registry):
    prompts = ["a red circle", f"{FILLER}, a red circle", "a blue square", f"{FILLER}, {FILLER}, red"]
    alone = _render(write_job, registry, prompts, batch=False)
    together = _render(write_job, registry, prompts, batch=True)
    for a, b in zip(alone, together):
        assert np.array_equal(a, b)


def test_a_weight_moves_the_colour_further_than_the_plain_word(write_job, registry):
    """Purple is red and blue: weighting red pulls the shape towards red, and more than a plain 'red' does."""
    prompts = ["a large purple circle in the centre, on a white background",
               "a large purple red circle in the centre, on a white background",
               "a large purple (red:1.6) circle in the centre, on a white background"]
    images = _render(write_job, registry, prompts, batch=False)

    def red_minus_blue(image):
        shape = image[np.abs(image - 255).sum(axis=2) > 120]  # pixels that are not the white background
        return float(shape[:, 0].mean() - shape[:, 2].mean())

    purple, plain, weighted = (red_minus_blue(image) for image in images)
    assert purple < plain < weighted, (purple, plain, weighted)
