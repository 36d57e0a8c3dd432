"""One bad item fails alone: the rest of its batch and of the run still render."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from sdbatch import hookimpl
from sdbatch.api import PostProcessor
from sdbatch.job import load_job
from sdbatch.run import LocalExecutor


@dataclass
class PickyOptions:
    bad_seed: int = 3


class Picky(PostProcessor):
    name = "picky"
    Options = PickyOptions

    def apply(self, image, options, item):
        if item.seed == options.bad_seed:
            raise ValueError(f"seed {item.seed} is not allowed")
        return image


class PickyPlugin:
    @hookimpl
    def register_postprocessors(register):
        register(Picky())


@pytest.mark.slow
def test_a_failing_item_does_not_take_its_batch_down(write_job, tiny_model, make_registry, tmp_path):
    registry = make_registry(PickyPlugin)
    job = load_job(write_job(f"""
        model: {tiny_model}
        steps: 2
        batch_size: 4
        sweep: {{seed: [1, 2, 3, 4]}}
        postprocess: [picky]
    """), registry)
    summary = LocalExecutor(job, registry, tmp_path / "out", quiet=True).run()
    assert (summary.rendered, summary.failed) == (3, 1)
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert [f["index"] for f in failures] == [2]
    assert "postprocessor 'picky'" in failures[0]["error"] and "seed 3 is not allowed" in failures[0]["error"]
