"""Bit-identity on the shipped model: batch size and kill -9 + resume never change a byte.

sdbatch-tiny runs the kernels a real model runs (its batch of 8 with CFG is 16 U-Net rows,
where PyTorch's CPU convolutions switch to NNPACK), so these tests catch what the random
test model's small batches cannot. One set of renders is shared by all assertions.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

BATCH_SIZES = (2, 3, 4, 5, 6, 7, 8, 12, 24)  # each against batch 1
STEPS = 6  # fewer than the model's 20: every step runs the same kernels

JOB = f"""\
name: tiny-batch
prompt: "a large {{red|blue|green}} {{circle|square}} in the centre, on a {{yellow|black}} background"
negative_prompt: ""
steps: {STEPS}
threads: 1
batch_size: 8
sweep:
  seed: {{start: 1, count: 2}}
outputs: [png]
"""


@pytest.fixture(scope="module")
def job_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-batch") / "job.yaml"
    path.write_text(JOB)
    return path


@pytest.fixture(scope="module")
def renders(job_file):
    """Pixels of every item alone, and of the first N items rendered as one batch of N."""
    import torch

    from sdbatch.job import load_job
    from sdbatch.plugins import load_registry
    from sdbatch.render import Renderer

    torch.set_num_threads(1)
    registry = load_registry()
    job = load_job(job_file, registry)
    items = list(job.plan)
    assert len(items) == 24 and items[0].model == "sdbatch-tiny"
    renderer = Renderer(registry, "cpu", "float32", job.plan.models)
    alone = [np.asarray(renderer.render([item])[0].image) for item in items]
    batched = {size: [np.asarray(r.image) for r in renderer.render(items[:size])] for size in BATCH_SIZES}
    fast_job = job_file.with_name("fast.yaml")
    fast_job.write_text(JOB + "batch_invariant: false\n")
    spec = load_job(fast_job, registry).spec
    assert spec.batch_invariant is False
    fast = Renderer(registry, "cpu", "float32", job.plan.models, batch_invariant=spec.batch_invariant)
    batched["fast"] = [np.asarray(r.image) for r in fast.render(items[:8])]
    return alone, batched


@pytest.mark.parametrize("size", BATCH_SIZES)
def test_shipped_model_pixels_do_not_depend_on_batch_size(renders, size):
    alone, batched = renders
    differ = [row for row, image in enumerate(batched[size]) if not np.array_equal(image, alone[row])]
    assert differ == [], f"batch {size}: rows {differ} differ from the same items rendered alone"


def test_batch_invariant_false_trades_the_last_bits_for_default_kernels(renders):
    # `batch_invariant: false` keeps PyTorch's kernels (its convolution dispatch by batch size, MKL's
    # few-row GEMMs): the same pictures to a level or two. Since convolutions call oneDNN directly
    # (sdbatch.rows) the two paths run nearly the same kernels, so the bytes often agree too.
    alone, batched = renders
    assert max(np.abs(image.astype(int) - alone[row]).max() for row, image in enumerate(batched["fast"])) <= 3


def test_the_renders_are_distinct_pictures(renders):
    alone, _ = renders
    assert len({image.tobytes() for image in alone}) == len(alone)  # a real sweep, not one image 24 times


def _png_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_kill_9_twice_then_resume_is_byte_identical(job_file, tmp_path, kill_run_after):
    from sdbatch.cli import main

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert main(["run", str(job_file), "-o", str(clean), "-q"]) == 0
    finished = 0
    for _ in range(2):  # each resume re-batches what is left, so batches start at other items
        finished = kill_run_after(job_file, killed, finished=finished + 1, timeout=300)
        assert 0 < finished < 24
    resumed = subprocess.run([sys.executable, "-m", "sdbatch", "run", str(job_file), "-o", str(killed), "-q"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    files = _png_bytes(clean)
    assert len(files) == 24
    assert _png_bytes(killed) == files
