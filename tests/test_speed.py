"""The GPU throughput options (`speed:`), exercised on the CPU: each renders, and each that can change
pixels is part of the item id. What only a GPU shows (speed, memory) is measured by bench/."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdbatch.errors import JobError
from sdbatch.job import load_job
from sdbatch.render import Renderer, decode_rows
from sdbatch.rows import fixed_chunks

pytestmark = pytest.mark.slow

BASE = """\
prompt: "a large red circle in the centre, on a blue background"
steps: 4
sweep: {seed: [1, 2, 3]}
"""


@pytest.fixture(scope="module")
def tiny_taesd(tmp_path_factory):
    """A random AutoencoderTiny (TAESD layout) for sdbatch-tiny's 4-channel, 4x latents."""
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        decoder = AutoencoderTiny(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16),
                                  num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4)
    folder = tmp_path_factory.mktemp("taesd") / "taesd"
    decoder.save_pretrained(folder)
    return folder


def _render(registry, path, batch=True):
    job = load_job(path, registry)
    renderer = Renderer(registry, "cpu", "float32", job.plan.models)
    items = list(job.plan)
    together = [np.asarray(r.image) for r in renderer.render(items)] if batch else None
    alone = [np.asarray(renderer.render([item])[0].image) for item in items]
    return job, items, together, alone


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    from sdbatch.plugins import load_registry

    path = tmp_path_factory.mktemp("plain") / "job.yaml"
    path.write_text(BASE)
    return _render(load_registry(), path, batch=False)


def test_tiny_vae_decodes_and_is_another_item(registry, write_job, tiny_taesd, plain):
    job, items, together, alone = _render(registry, write_job(BASE + f"speed: {{tiny_vae: {tiny_taesd}}}\n"))
    _, plain_items, _, plain_alone = plain
    assert all(np.array_equal(a, b) for a, b in zip(together, alone))  # rows stay independent
    assert alone[0].shape == plain_alone[0].shape
    assert not np.array_equal(alone[0], plain_alone[0])  # another decoder
    assert items[0].id != plain_items[0].id


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])  # inductor needs a C compiler and minutes
def test_compile_renders_the_same_pixels(registry, write_job, plain, backend):
    _, items, _, alone = _render(registry, write_job(  # one batch shape: one trace
        BASE + f"speed: {{compile: default, compile_backend: {backend}}}\n"), batch=False)
    _, plain_items, _, plain_alone = plain
    for ours, theirs in zip(alone, plain_alone):
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1  # traced graphs may fuse differently
    assert items[0].id != plain_items[0].id


def test_channels_last_renders(registry, write_job, plain):
    _, items, together, alone = _render(registry, write_job(BASE + "speed: {channels_last: true}\n"))
    _, plain_items, _, plain_alone = plain
    for ours, theirs in zip(alone, plain_alone):
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert all(np.array_equal(a, b) for a, b in zip(together, alone))
    assert items[0].id != plain_items[0].id


def test_decode_batch_renders_and_is_another_item(registry, write_job, plain):
    """``decode_batch`` sets the rows per VAE call on CUDA; the CPU decodes row by row whatever it says."""
    _, items, together, alone = _render(registry, write_job(BASE + "speed: {decode_batch: 2}\n"))
    _, plain_items, _, plain_alone = plain
    assert all(np.array_equal(a, b) for a, b in zip(alone, plain_alone))
    assert all(np.array_equal(a, b) for a, b in zip(together, alone))
    assert items[0].id != plain_items[0].id


def test_defaults_keep_ids(registry, write_job, plain):
    job = load_job(write_job(BASE + "speed: {compile: 'off', channels_last: false, decode_batch: 0}\n"), registry)
    assert [item.id for item in job.plan] == [item.id for item in plain[1]]


def test_decoding_in_fixed_chunks_gives_the_rows_own_pixels(registry, write_job, monkeypatch):
    """The GPU path decodes several rows per call; with a VAE whose kernels are row-independent it must
    give the bytes of one row per call (padded chunks keep one kernel shape)."""
    import sdbatch.render as render
    from sdbatch.rows import make_rows_independent

    job = load_job(write_job(BASE), registry)
    renderer = Renderer(registry, "cpu", "float32", job.plan.models)
    items = list(job.plan)
    make_rows_independent(renderer.model_for(items[0]).vae)  # the CPU stands in for a GPU's fixed shapes
    alone = [np.asarray(renderer.render([item])[0].image) for item in items]
    monkeypatch.setattr(render, "decode_rows", lambda model, shape: 2)
    chunked = [np.asarray(r.image) for r in renderer.render(items)]  # chunks [1, 2] and [3, 3 again]
    assert all(np.array_equal(a, b) for a, b in zip(chunked, alone))
    chunks = fixed_chunks(torch.arange(5.0)[:, None], 2)
    assert [c.flatten().tolist() for c in chunks] == [[0, 1], [2, 3], [4, 4]]


def test_decode_rows_policy():
    from types import SimpleNamespace

    def model(device, **memory):
        return SimpleNamespace(device=device, info=SimpleNamespace(memory=memory), vae_scale_factor=8,
                               dtype=torch.float16)

    shape = (8, 4, 64, 64)
    assert decode_rows(model("cpu"), shape) == 1  # row by row: independent rows, flat memory
    assert decode_rows(model("cuda:0", decode_batch=4), shape) == 4
    assert decode_rows(model("cuda:0", decode_batch=4, vae_slicing=True), shape) == 1


@pytest.mark.parametrize("total_gib, rows", [(80, 8), (24, 8), (8, 5), (1, 1)])
def test_the_gpu_decode_chunk_follows_the_gpus_total_memory_not_what_is_free(monkeypatch, total_gib, rows):
    # A 512x512 float16 row takes about 0.4 GB at the decoder's peak: a quarter of the GPU holds this many.
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=total_gib << 30))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: pytest.fail("free memory changes between runs"))
    model = SimpleNamespace(device="cuda:0", info=SimpleNamespace(memory={}), vae_scale_factor=8, dtype=torch.float16)
    assert decode_rows(model, (8, 4, 64, 64)) == rows


def test_a_missing_tiny_vae_stops_at_its_line(registry, write_job, tmp_path):
    path = write_job(BASE + f"speed:\n  tiny_vae: {tmp_path / 'nowhere'}\n")
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    assert "no AutoencoderTiny at" in str(error.value) and ":5:" in str(error.value)
