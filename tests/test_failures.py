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


class Flaky(PostProcessor):
    """Fails the first time it sees each item, then works: a transient error."""

    name = "flaky"
    seen: set = set()

    def apply(self, image, options, item):
        if item.id not in self.seen:
            self.seen.add(item.id)
            raise MemoryError("out of memory (simulated)")
        return image


class FlakyPlugin:
    @hookimpl
    def register_postprocessors(register):
        register(Flaky())


@pytest.mark.slow
@pytest.mark.parametrize("retries, failed", [(0, 2), (1, 0)])
def test_failing_items_are_retried_a_bounded_number_of_times(write_job, tiny_model, make_registry, tmp_path,
                                                               retries, failed):
    Flaky.seen = set()
    registry = make_registry(FlakyPlugin)
    job = load_job(write_job(f"""
        model: {tiny_model}
        steps: 2
        retries: {retries}
        sweep: {{seed: [1, 2]}}
        postprocess: [flaky]
    """), registry)
    summary = LocalExecutor(job, registry, tmp_path / "out", quiet=True).run()
    assert (summary.failed, summary.rendered) == (failed, 2 - failed)


def test_random_prompt_sampling_is_reproducible_per_item(write_job, tiny_model, registry):
    text = f"""
        model: {tiny_model}
        prompt_sampling: random
        prompt: "a {{small|large}} {{red|blue|green}} {{circle|square}} {{on the left|on the right}}"
        sweep: {{seed: {{start: 0, count: 1000}}, guidance: [3, 7]}}
    """
    plan = load_job(write_job(text), registry).plan
    again = load_job(write_job(text, "again.yaml"), registry).plan
    assert len(plan) == 2000  # one prompt per item, not every combination
    prompts = [plan.item_at(i).prompt for i in range(0, 2000, 2)]
    assert prompts == [again.item_at(i).prompt for i in range(0, 2000, 2)]
    assert plan.item_at(0).prompt == plan.item_at(1).prompt  # same seed, other guidance: same prompt
    assert len(set(prompts)) == 24 and all("{" not in p for p in prompts)  # every variant appears
