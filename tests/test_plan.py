"""The lazy plan: arithmetic counting, deterministic ids and order, zips, prompt templates, defaults.

Planning must not import torch: those checks run ``sdbatch`` in a fresh interpreter.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdbatch.cli import main
from sdbatch.job import load_job


@pytest.fixture
def plan_of(registry, write_job, tiny_model):
    """Validate a job (``{model}`` is the tiny model folder) and return its plan."""

    def make(body: str, name: str = "job.yaml"):
        path = write_job(body.replace("{model}", str(tiny_model)), name=name)
        return load_job(path, registry).plan

    return make


def fake_model(folder: Path, defaults: dict | None = None) -> Path:
    """A folder that describes like a diffusers model (no weights are read while planning)."""
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "unet").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    if defaults is not None:
        (folder / "sdbatch.json").write_text(json.dumps(defaults))
    return folder


# ---------------------------------------------------------------- size and counting
def test_ten_million_items_count_by_arithmetic(plan_of):
    prompts = [f"prompt number {i}" for i in range(1000)]
    began = time.perf_counter()
    plan = plan_of(f"""
        model: {{model}}
        sweep:
          seed: {{start: 5, count: 10000}}
          prompt: {json.dumps(prompts)}
        """)
    assert len(plan) == 10_000_000
    last = plan.item_at(9_999_999)
    elapsed = time.perf_counter() - began
    assert elapsed < 1.0, f"validating and counting took {elapsed:.2f}s"
    assert (last.seed, last.prompt) == (5 + 9999, "prompt number 999")
    middle = plan.item_at(1234 * 1000 + 56)  # the first axis (seed) varies slowest
    assert (middle.seed, middle.prompt) == (5 + 1234, "prompt number 56")
    with pytest.raises(IndexError):
        plan.item_at(10_000_000)


def test_seed_range_with_step(plan_of):
    plan = plan_of("""
        model: {model}
        sweep:
          seed: {start: 100, count: 4, step: 10}
        """)
    assert [item.seed for item in plan] == [100, 110, 120, 130]


def test_plan_count_and_slice_on_the_command_line(plan_of, write_job, tiny_model, capsys):
    body = f"""
        model: {tiny_model}
        sweep:
          seed: [1, 2, 3, 4, 5]
          guidance: [1, 7]
        """
    plan = plan_of(body)
    path = write_job(body)
    assert main(["plan", str(path), "--count"]) == 0
    assert capsys.readouterr().out.strip() == "10"
    assert main(["plan", str(path), "--offset", "3", "--limit", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["index"] for row in rows] == [3, 4, 5, 6]
    assert [row["id"] for row in rows] == [plan.item_at(i).id for i in range(3, 7)]


# ---------------------------------------------------------------- identity and order
SWEEP_JOB = """
    model: {model}
    prompt: a red circle
    steps: 3
    sweep:
      seed: [1, 2, 3]
      guidance: [1, 7]
    outputs: [png]
    """


def test_ids_are_deterministic_16_hex_and_unique(plan_of):
    first = [item.id for item in plan_of(SWEEP_JOB)]
    second = [item.id for item in plan_of(SWEEP_JOB, name="again.yaml")]
    assert first == second
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in first)
    assert len(set(first)) == len(first) == 6


def test_ids_survive_a_fresh_interpreter(plan_of, write_job, tiny_model):
    path = write_job(SWEEP_JOB.replace("{model}", str(tiny_model)), name="fresh.yaml")
    out = subprocess.run([sys.executable, "-m", "sdbatch", "plan", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert [json.loads(line)["id"] for line in out.splitlines()] == [item.id for item in plan_of(SWEEP_JOB)]


def test_output_settings_do_not_change_ids(plan_of):
    base = [item.id for item in plan_of(SWEEP_JOB)]
    jpeg = SWEEP_JOB.replace("outputs: [png]", "outputs: [jpeg, {webp: {quality: 50, path: '{id}.{ext}'}}]")
    assert [item.id for item in plan_of(jpeg)] == base
    named = SWEEP_JOB.replace("steps: 3", "steps: 3\n    name: other")
    assert [item.id for item in plan_of(named)] == base


@pytest.mark.parametrize("change", [
    ("steps: 3", "steps: 4"),
    ("prompt: a red circle", "prompt: a blue circle"),
    ("guidance: [1, 7]", "guidance: [1, 7.5]"),
])
def test_content_changes_change_ids(plan_of, change):
    base = [item.id for item in plan_of(SWEEP_JOB)]
    changed = [item.id for item in plan_of(SWEEP_JOB.replace(*change))]
    if change[0].startswith("guidance"):
        # Only the items whose guidance changed get new ids.
        assert changed[0::2] == base[0::2]
        assert all(a != b for a, b in zip(changed[1::2], base[1::2]))
    else:
        assert not set(changed) & set(base)


def test_guidance_changes_the_id_of_a_single_item(plan_of):
    one = plan_of("model: {model}\nguidance: 7\n").item_at(0)
    other = plan_of("model: {model}\nguidance: 7.5\n").item_at(0)
    same = plan_of("model: {model}\nguidance: 7.0\n").item_at(0)
    assert one.id != other.id
    assert one.id == same.id  # 7 and 7.0 are the same guidance


def test_first_axis_varies_slowest(plan_of):
    plan = plan_of(SWEEP_JOB)
    assert [(item.seed, item.guidance) for item in plan] == list(itertools.product([1, 2, 3], [1.0, 7.0]))
    assert [item.index for item in plan] == list(range(6))
    swapped = plan_of("""
        model: {model}
        sweep:
          guidance: [1, 7]
          seed: [1, 2, 3]
        """)
    assert [(item.guidance, item.seed) for item in swapped] == list(itertools.product([1.0, 7.0], [1, 2, 3]))


def test_zipped_axes_walk_together(plan_of):
    plan = plan_of("""
        model: {model}
        sweep:
          seed: [1, 2, 3]
          steps: [2, 3, 4]
          guidance: [1, 7]
        zip:
          - [seed, steps]
        """)
    assert len(plan) == 6
    assert [(i.seed, i.steps, i.guidance) for i in plan] == [
        (seed, steps, g) for seed, steps in [(1, 2), (2, 3), (3, 4)] for g in (1.0, 7.0)
    ]


def test_items_record_their_axis_values(plan_of):
    item = plan_of(SWEEP_JOB).item_at(3)
    assert item.axes == {"seed": 2, "guidance": 7.0}


# ---------------------------------------------------------------- prompts
def test_dynamic_prompt_template_expands_combinatorially(plan_of):
    plan = plan_of("""
        model: {model}
        prompt: "a {red|blue} {circle|square}"
        """)
    assert len(plan) == 4
    prompts = [item.prompt for item in plan]
    assert sorted(prompts) == sorted(["a red circle", "a red square", "a blue circle", "a blue square"])
    assert {item.template for item in plan} == {"a {red|blue} {circle|square}"}
    assert [item.prompt for item in plan] == prompts  # same order every time


def test_template_variants_cross_with_other_axes(plan_of):
    plan = plan_of("""
        model: {model}
        prompt: "a {red|blue} circle"
        sweep:
          seed: [1, 2, 3]
        """)
    assert len(plan) == 6
    assert {(i.prompt, i.seed) for i in plan} == set(itertools.product(["a red circle", "a blue circle"], [1, 2, 3]))


def test_wildcards_from_a_folder(plan_of, tmp_path):
    (tmp_path / "wild").mkdir()
    (tmp_path / "wild" / "colour.txt").write_text("red\ngreen\nblue\n")
    plan = plan_of("""
        model: {model}
        wildcards: wild
        prompt: "a __colour__ cat"
        """)
    assert sorted(item.prompt for item in plan) == ["a blue cat", "a green cat", "a red cat"]
    assert all(item.template == "a __colour__ cat" for item in plan)


def test_swept_prompts_expand_each_template(plan_of):
    plan = plan_of("""
        model: {model}
        sweep:
          prompt: ["plain words", "a {red|blue} dot"]
        """)
    assert sorted(i.prompt for i in plan) == ["a blue dot", "a red dot", "plain words"]


# ---------------------------------------------------------------- item fields
def test_size_axis_sets_width_and_height(plan_of):
    plan = plan_of("""
        model: {model}
        sweep:
          size: ["64x64", "128x64"]
        """)
    assert [(i.width, i.height) for i in plan] == [(64, 64), (128, 64)]


def test_plugin_option_axis_lands_in_postprocess_options(plan_of):
    plan = plan_of("""
        model: {model}
        postprocess: [resize]
        sweep:
          resize.scale: [1, 2]
        """)
    items = list(plan)
    assert [i.postprocess[0].name for i in items] == ["resize", "resize"]
    assert [i.postprocess[0].options["scale"] for i in items] == [1.0, 2.0]
    assert items[0].id != items[1].id


def test_plugin_option_axis_is_type_checked(registry, write_job, tiny_model):
    from sdbatch.errors import JobError

    path = write_job(f"""
        model: {tiny_model}
        postprocess: [resize]
        sweep:
          resize.scale: [1, "big"]
        """)
    with pytest.raises(JobError, match=r"sweep\.resize\.scale\[1\]: expected a number"):
        load_job(path, registry)


def test_model_defaults_come_from_sdbatch_json(registry, write_job, tmp_path):
    fake_model(tmp_path / "custom", {"width": 128, "height": 96, "steps": 13, "guidance": 5.5, "sampler": "DDIM"})
    item = load_job(write_job("model: custom\n"), registry).plan.item_at(0)
    assert (item.width, item.height, item.steps, item.guidance, item.sampler) == (128, 96, 13, 5.5, "DDIM")
    # The job's own values win over the model's.
    item = load_job(write_job("model: custom\nsteps: 5\nsampler: Euler\n"), registry).plan.item_at(0)
    assert (item.steps, item.sampler, item.width) == (5, "Euler", 128)


def test_tiny_model_defaults(plan_of):
    item = plan_of("model: {model}\n").item_at(0)
    assert (item.width, item.height, item.steps, item.sampler) == (64, 64, 4, "Euler a")


def test_model_without_sdbatch_json_uses_fallbacks(registry, write_job, tmp_path):
    fake_model(tmp_path / "plain")
    item = load_job(write_job("model: plain\n"), registry).plan.item_at(0)
    assert (item.width, item.height, item.steps, item.guidance, item.sampler) == (512, 512, 20, 7.0, "Euler a")


def test_model_sweep(registry, write_job, tmp_path):
    fake_model(tmp_path / "one", {"width": 64, "height": 64})
    fake_model(tmp_path / "two", {"width": 128, "height": 128})
    plan = load_job(write_job("model: one\nsweep:\n  model: [one, two]\n  seed: [1, 2]\n"), registry).plan
    assert len(plan) == 4
    assert [(i.model, i.seed, i.width) for i in plan] == [("one", 1, 64), ("one", 2, 64),
                                                          ("two", 1, 128), ("two", 2, 128)]


# ---------------------------------------------------------------- no torch while planning
def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", ["plan --count", "validate", "plan --limit 3"])
def test_planning_imports_no_torch(write_job, tiny_model, command):
    path = write_job(f"""
        model: {tiny_model}
        prompt: "a {{red|blue}} circle"
        postprocess: [resize]
        sweep:
          seed: {{start: 0, count: 1000}}
          resize.scale: [1, 2]
        outputs: [png, {{xyz_grid: {{x: seed}}}}]
        """)
    argv = command.split()[:1] + [str(path)] + command.split()[1:]
    result = _run_python(
        "import sys\n"
        "from sdbatch.cli import main\n"
        f"code = main({argv!r})\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy', 'cv2') if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stderr
    if command == "plan --count":
        assert result.stdout.strip() == "4000"


def test_validate_starts_quickly(write_job, tiny_model):
    path = write_job(f"model: {tiny_model}\nsweep:\n  seed: [1, 2, 3]\n")
    cmd = [sys.executable, "-m", "sdbatch", "validate", str(path)]
    subprocess.run(cmd, capture_output=True, check=True)  # warm the file cache
    began = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - began
    assert result.returncode == 0, result.stderr
    assert "ok, 3 items" in result.stdout
    # "well under a second" on an idle machine; this one is shared, hence the margin.
    assert elapsed < 1.5, f"sdbatch validate took {elapsed:.2f}s"


def test_importtime_lists_no_torch(write_job, tiny_model):
    path = write_job(f"model: {tiny_model}\n")
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "sdbatch", "plan", str(path), "--count"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip()
                for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "sdbatch.job" in imported
    assert not {name for name in imported if name.split(".")[0] in {"torch", "diffusers", "transformers"}}
