"""The example jobs: each plans few enough items to finish in minutes on a laptop CPU, and shows what
its name says (validated and planned only; no model is loaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sdbatch.job import load_job

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))
#: sdbatch-tiny renders a 64x64 image in about 0.35 s on one laptop core: 250 items is about 90 s.
MOST_ITEMS = 250


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_every_example_job_finishes_in_minutes(registry, path):
    if path.stem == "colorgrade" and importlib.util.find_spec("sdbatch_colorgrade") is None:
        pytest.skip("needs pip install ./examples/sdbatch-colorgrade")
    job = load_job(path, registry)
    assert 0 < len(job.plan) <= MOST_ITEMS
    assert path.read_text().startswith("# "), "the first line says what the job shows"


def test_the_grid_job_is_an_xyz_grid(registry):
    job = load_job(next(p for p in JOBS if p.stem == "grid"), registry)
    ((_cls, options, _use),) = [w for w in job.writers if w[2].name == "xyz_grid"]
    axes = {name for axis in job.plan.axes for name in axis.names}
    assert {options.x, options.y, options.z} <= axes and len({options.x, options.y, options.z}) == 3


def test_the_dataset_job_ends_in_finished_shards(registry):
    job = load_job(next(p for p in JOBS if p.stem == "dataset"), registry)
    ((_cls, options, _use),) = [w for w in job.writers if w[2].name == "webdataset"]
    assert len(job.plan) > options.shard_size  # several shards, the last one short
