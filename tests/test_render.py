"""The determinism contract: an item's pixels depend on the item and the model only."""

from __future__ import annotations

import numpy as np
import pytest

from sdbatch.job import load_job
from sdbatch.render import Renderer

pytestmark = pytest.mark.slow


def _job(write_job, tiny_model, sampler="Euler a", extra=""):
    return write_job(f"""
        model: {tiny_model}
        prompt: "a red circle"
        negative_prompt: "blurry"
        sampler: "{sampler}"
        steps: 3
        sweep:
          seed: {{start: 40, count: 3}}
          guidance: [1, 7.5]
        {extra}
    """)


def _pixels(results):
    return {r.item.id: np.asarray(r.image) for r in results}


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "DPM++ SDE", "DDIM"])
def test_batch_composition_and_order_do_not_change_pixels(write_job, tiny_model, registry, sampler):
    job = load_job(_job(write_job, tiny_model, sampler), registry)
    items = list(job.plan)
    renderer = Renderer(registry, "cpu", "float32", job.plan.models)
    alone = {}
    for item in items:
        alone.update(_pixels(renderer.render([item])))
    together = _pixels(renderer.render(items))
    reversed_order = _pixels(renderer.render(items[::-1]))
    for item in items:
        assert np.array_equal(alone[item.id], together[item.id]), item.to_json()
        assert np.array_equal(alone[item.id], reversed_order[item.id]), item.to_json()
    # The sweep really varies the pictures: distinct seeds give distinct images.
    assert len({alone[i.id].tobytes() for i in items}) == len(items)
    assert renderer.cache.loads == 1  # one load per (model, device, dtype), not per item


def test_same_item_twice_is_bit_identical_across_renderers(write_job, tiny_model, registry):
    job = load_job(_job(write_job, tiny_model), registry)
    item = job.plan.item_at(3)
    first = _pixels(Renderer(registry, "cpu", "float32", job.plan.models).render([item]))
    second = _pixels(Renderer(registry, "cpu", "float32", job.plan.models).render([item]))
    assert np.array_equal(first[item.id], second[item.id])


def test_single_file_checkpoint_renders_like_its_folder(write_job, tiny_model, registry):
    single = tiny_model.parent / "tiny.safetensors"
    folder_job = load_job(_job(write_job, tiny_model), registry)
    file_job = load_job(write_job(f"""
        model: {single}
        model_config: {tiny_model}
        prompt: "a red circle"
        negative_prompt: "blurry"
        steps: 3
        sweep:
          seed: {{start: 40, count: 3}}
          guidance: [1, 7.5]
    """, "file.yaml"), registry)
    assert file_job.plan.models[str(single)].kind == "single-file"
    a = Renderer(registry, "cpu", "float32", folder_job.plan.models).render([folder_job.plan.item_at(1)])[0]
    b = Renderer(registry, "cpu", "float32", file_job.plan.models).render([file_job.plan.item_at(1)])[0]
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.model_hash and b.model_hash and a.model_hash != b.model_hash  # hashes name the files loaded


def test_guidance_changes_pixels_and_seed_reproduces_noise(write_job, tiny_model, registry):
    from sdbatch.latents import initial_noise

    job = load_job(_job(write_job, tiny_model), registry)
    renderer = Renderer(registry, "cpu", "float32", job.plan.models)
    low, high = renderer.render([job.plan.item_at(0), job.plan.item_at(1)])  # guidance 1 and 7.5, seed 40
    assert not np.array_equal(np.asarray(low.image), np.asarray(high.image))
    assert initial_noise(40, (4, 8, 8)).equal(initial_noise(40, (4, 8, 8)))
    assert not initial_noise(40, (4, 8, 8)).equal(initial_noise(41, (4, 8, 8)))


def test_pinned_threads_make_cpu_pixels_independent_of_the_environment(write_job, tmp_path):
    """CPU kernels split sums by thread count; `threads:` pins it (here against OMP_NUM_THREADS)."""
    import os
    import subprocess
    import sys

    job = write_job("""
        threads: 2
        prompt: "a large {red|blue} circle in the centre, on a yellow background"
        sweep: {seed: [1, 2]}
    """)
    outputs = []
    for threads in ("1", "2"):
        out = tmp_path / f"out{threads}"
        subprocess.run([sys.executable, "-m", "sdbatch", "run", str(job), "-o", str(out), "-q"], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": threads})
        outputs.append({p.name: p.read_bytes() for p in out.rglob("*.png")})
    assert len(outputs[0]) == 4 and outputs[0] == outputs[1]
