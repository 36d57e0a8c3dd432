"""A plugin that raises while a job runs is named, with its package, and fails only its own items."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

import sdbatch
from sdbatch.api import Conditioner, PostProcessor, Writer
from sdbatch.errors import OutputConflict, PluginError
from sdbatch.job import load_job
from sdbatch.plugins import Entry, Origin, PluginCallError, describe_entry, plugin_errors

INSTALLED = Entry("postprocessor", "colorgrade", object(), Origin("colorgrade", "sdbatch-colorgrade", "0.1.0"))


# ---------------------------------------------------------------- the helper
def test_an_exception_is_renamed_after_the_plugin_and_package():
    with pytest.raises(PluginCallError) as info:
        with plugin_errors(INSTALLED):
            raise ValueError("gamma must be positive")
    assert str(info.value) == ("postprocessor 'colorgrade' (plugin colorgrade, package sdbatch-colorgrade 0.1.0) "
                               "failed: ValueError: gamma must be positive")
    assert isinstance(info.value.__cause__, ValueError)  # the original traceback is kept


def test_a_plugin_registered_in_code_says_so():
    entry = Entry("model_loader", "zoo", object(), Origin("ZooPlugin", "(registered in code)"))
    assert describe_entry(entry) == "model loader 'zoo' (plugin ZooPlugin, registered in code)"


def test_sdbatch_errors_pass_through_and_fatal_stops_the_run():
    with pytest.raises(OutputConflict, match="^refusing$"):
        with plugin_errors(INSTALLED):
            raise OutputConflict("refusing")
    with pytest.raises(PluginError, match=r"^postprocessor 'colorgrade' \(plugin colorgrade.*KeyError: 'x'$"):
        with plugin_errors(INSTALLED, fatal=True):
            raise KeyError("x")
    assert not issubclass(PluginCallError, sdbatch.errors.SdbatchError)  # so a run records it and goes on


# ---------------------------------------------------------------- in a run
@dataclass
class FailOptions:
    seed: int = 2  # the item seed to fail on


class FailingGrade(PostProcessor):
    name = "fail_grade"
    Options = FailOptions

    def apply(self, image, options, item):
        if item.seed == options.seed:
            raise ValueError(f"cannot grade seed {item.seed}")
        return image


class FailingConditioner(Conditioner):
    name = "fail_cond"
    Options = FailOptions

    def condition(self, items, options, model, state):
        if any(item.seed == option.seed for item, option in zip(items, options)):
            raise RuntimeError("no control image")


class FailingWriter(Writer):
    name = "fail_writer"
    Options = FailOptions

    def write(self, result):
        if result.item.seed == self.options.seed:
            raise OSError("disk on fire")
        return []

    def finish(self, entries):
        raise RuntimeError(f"cannot index {len(entries)} entries")


class Failing:
    @sdbatch.hookimpl
    def register_postprocessors(register):
        register(FailingGrade())

    @sdbatch.hookimpl
    def register_conditioners(register):
        register(FailingConditioner())

    @sdbatch.hookimpl
    def register_writers(register):
        register(FailingWriter)


def _run(make_registry, write_job, tiny_model, out, extra: str):
    from sdbatch.run import LocalExecutor

    registry = make_registry(Failing)
    job = load_job(write_job(f"model: {tiny_model}\nsteps: 2\nbatch_size: 1\nsweep: {{seed: [1, 2, 3]}}\n{extra}"),
                   registry)
    return LocalExecutor(job, registry, out, quiet=True).run()


def _failures(out) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("extra, expected", [
    ("postprocess: [fail_grade]",
     "postprocessor 'fail_grade' (plugin Failing, registered in code) failed: ValueError: cannot grade seed 2"),
    ("conditioners: [text, fail_cond]",
     "conditioner 'fail_cond' (plugin Failing, registered in code) failed: RuntimeError: no control image"),
], ids=["postprocessor", "conditioner"])
def test_a_failing_renderer_plugin_fails_only_its_items(make_registry, write_job, tiny_model, tmp_path,
                                                        extra, expected):
    out = tmp_path / "out"
    summary = _run(make_registry, write_job, tiny_model, out, extra)
    assert (summary.rendered, summary.failed) == (2, 1)  # the run went on past the failure
    (failure,) = _failures(out)
    assert failure["error"] == f"PluginCallError: {expected}"
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_a_failing_writer_fails_its_item_then_stops_the_run_at_finish(make_registry, write_job, tiny_model, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PluginError) as info:
        _run(make_registry, write_job, tiny_model, out, "outputs: [png, fail_writer]")
    assert str(info.value) == ("writer 'fail_writer' (plugin Failing, registered in code) failed: "
                               "RuntimeError: cannot index 2 entries")
    (failure,) = _failures(out)
    assert failure["error"] == ("PluginCallError: writer 'fail_writer' (plugin Failing, registered in code) "
                                "failed: OSError: disk on fire")
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2  # seeds 1 and 3 are finished
