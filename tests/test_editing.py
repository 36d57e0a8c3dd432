"""Semantic editing: plan shape, strength 0, the local basis against the full Jacobian, saved directions."""

from __future__ import annotations

import numpy as np
import pytest

from sdbatch.errors import JobError
from sdbatch.job import load_job
from sdbatch.render import Renderer


def _edit_job(write_job, tiny_model, directions, strengths="[-1, 0, 1]", name="edit.yaml"):
    lines = [f"model: {tiny_model}", "steps: 4", "guidance: 5", "edit:",
             '  source: {prompt: "a red circle on a blue background", seed: 7}', "  directions:"]
    lines += ["  " + line.strip() for line in directions.splitlines()]
    lines += [f"  strengths: {strengths}", "outputs: [png, strip, directions]"]
    return write_job("\n".join(lines) + "\n", name)


PROMPT_DIFF = '    - {kind: prompt-difference, from: "a red circle", to: "a blue circle"}'
LOCAL = "    - {kind: local-basis, prompt: 'a circle', timestep: 0.5, count: 2, iterations: 4}"
SEGA = "    - {kind: sega, prompt: 'blue', warmup: 0}"


def test_edit_plan_is_sources_by_directions_by_strengths(write_job, tiny_model, registry):
    job = load_job(_edit_job(write_job, tiny_model, "\n".join([PROMPT_DIFF, LOCAL]),
                             "{from: -2, to: 2, steps: 5}"), registry)
    assert len(job.plan) == 1 * 3 * 5  # prompt-difference gives 1 direction, local-basis count 2
    items = list(job.plan)
    assert [i.extra["edit"]["strength"] for i in items[:5]] == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert items[0].sampler == "DDIM"  # edits replay deterministic trajectories
    assert {i.axes["direction"] for i in items} == {
        "0: a red circle -> a blue circle", "1: local basis 1/2 'a circle' t=0.5", "2: local basis 2/2 'a circle' t=0.5"}
    assert len({i.id for i in items}) == len(items)


def test_edit_validation_errors(write_job, tiny_model, registry):
    path = write_job(f"""
        model: {tiny_model}
        sweep: {{seed: [1, 2]}}
        edit:
          directions:
            - {{kind: prompt-diference, from: a, to: b}}
            - {{kind: local-basis, count: 0}}
            - {{from: a}}
          strengths: {{from: -1, to: 1, steps: 0}}
    """)
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    text = str(error.value)
    for expected in ["'seed' comes from the edit's sources", "an edit needs a source",
                     "unknown direction 'prompt-diference' (did you mean 'prompt-difference'?)",
                     "edit.directions[1].count: must be at least 1", "missing required key 'kind'",
                     "edit.strengths.steps: must be at least 1"]:
        assert expected in text, expected


@pytest.mark.slow
@pytest.mark.parametrize("direction", [PROMPT_DIFF, LOCAL, SEGA])
def test_strength_zero_reproduces_the_unedited_image(write_job, tiny_model, registry, direction):
    job = load_job(_edit_job(write_job, tiny_model, direction), registry)
    still = load_job(write_job(f"""
        model: {tiny_model}
        steps: 4
        guidance: 5
        sampler: DDIM
        prompt: "a red circle on a blue background"
        seed: 7
    """, "still.yaml"), registry)
    renderer = Renderer(registry, "cpu", "float32", {**job.plan.models, **still.plan.models})
    items = [i for i in job.plan if i.axes["direction"].startswith("0:")]
    edited = {i.extra["edit"]["strength"]: np.asarray(r.image) for i, r in zip(items, renderer.render(items))}
    unedited = np.asarray(renderer.render([still.plan.item_at(0)])[0].image)
    assert np.array_equal(edited[0.0], unedited)
    assert not np.array_equal(edited[1.0], unedited) and not np.array_equal(edited[-1.0], unedited)


@pytest.mark.slow
def test_local_basis_agrees_with_the_svd_of_the_full_jacobian(tiny_model, registry, write_job):
    import torch

    from sdbatch_plugins.directions import local_basis, mid_block_features

    job = load_job(write_job(f"model: {tiny_model}\nprompt: a circle\n"), registry)
    model = Renderer(registry, "cpu", "float32", job.plan.models).model_for(job.plan.item_at(0))
    embeds = model.encode_prompt("a circle")["encoder_hidden_states"].clone()
    x_t = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3))
    vectors, values = local_basis(model.unet, x_t, 500, embeds, count=3, iterations=30, seed=1)

    assert torch.allclose(vectors.T @ vectors, torch.eye(3), atol=1e-5)  # orthonormal
    assert values[0] >= values[1] >= values[2] > 0  # descending
    from diffusers.models.attention_processor import AttnProcessor

    processors = model.unet.attn_processors
    model.unet.set_attn_processor(AttnProcessor())
    try:
        # Forward mode: one product per input dimension (256), batched with vmap.
        jacobian = torch.autograd.functional.jacobian(
            lambda z: mid_block_features(model.unet, z, 500, embeds).flatten(), x_t,
            vectorize=True, strategy="forward-mode").reshape(-1, x_t.numel())
    finally:
        model.unet.set_attn_processor(processors)
    _, singular, right = torch.linalg.svd(jacobian, full_matrices=False)
    assert torch.allclose(values, singular[:3], rtol=1e-3)
    for i in range(3):
        assert abs(float(vectors[:, i] @ right[i])) > 0.999


@pytest.mark.slow
def test_saved_direction_reloads_identically_and_renders_the_same(write_job, tiny_model, registry, tmp_path):
    import torch

    from sdbatch.cli import main
    from sdbatch.editing import load_direction

    path = _edit_job(write_job, tiny_model, PROMPT_DIFF)
    assert main(["run", str(path), "-o", str(tmp_path / "a"), "-q"]) == 0
    saved = sorted((tmp_path / "a" / "directions").glob("*.safetensors"))
    assert len(saved) == 1
    direction = load_direction(saved[0])
    assert direction.space == "text" and direction.meta["pairs"] == [["a red circle", "a blue circle"]]
    assert torch.equal(load_direction(saved[0]).tensor, direction.tensor)
    assert len(list((tmp_path / "a" / "strips").glob("*.png"))) == 1

    reuse = _edit_job(write_job, tiny_model, f"    - {{kind: file, path: {saved[0]}}}", name="reuse.yaml")
    assert main(["run", str(reuse), "-o", str(tmp_path / "b"), "-q"]) == 0
    # Same source, same direction, same strengths: the same pixels (ids differ: the direction's kind does).
    images_a = sorted(_pixels(p.read_bytes()) for p in (tmp_path / "a").glob("*/*.png") if p.parent.name != "strips")
    images_b = sorted(_pixels(p.read_bytes()) for p in (tmp_path / "b").glob("*/*.png") if p.parent.name != "strips")
    assert len(images_a) == 3 and images_a == images_b


def _pixels(png: bytes) -> bytes:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png)).tobytes()


@pytest.mark.slow
def test_a_real_image_source_is_inverted_and_edited(write_job, tiny_model, tmp_path):
    from PIL import Image

    from sdbatch.cli import main

    Image.new("RGB", (64, 64), (210, 40, 40)).save(tmp_path / "photo.png")
    path = write_job(f"""
        model: {tiny_model}
        steps: 4
        guidance: 1
        edit:
          source: {{image: photo.png, prompt: "a red square"}}
          directions: [{{kind: prompt-difference, from: "a red square", to: "a blue square"}}]
          strengths: [0, 2]
        outputs: [png]
    """)
    assert main(["run", str(path), "-o", str(tmp_path / "out"), "-q"]) == 0
    images = sorted((tmp_path / "out").glob("*/*.png"))
    assert len(images) == 2
    pixels = [np.asarray(Image.open(p)).astype(int) for p in images]
    assert np.abs(pixels[0] - pixels[1]).mean() > 0  # the edit changed the inverted image
