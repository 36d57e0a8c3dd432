"""The xyz_grid writer: cells where the items' images are, labels in the bands, one grid per z value."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from sdbatch.cli import main
from sdbatch.errors import JobError
from sdbatch.job import load_job

SEEDS = [1, 2, 3]
GUIDANCES = [1.0, 7.0]
CELL = 64


def job_text(model: Path, grid: str) -> str:
    return f"""
        model: {model}
        prompt: a green square
        steps: 2
        sweep:
          seed: {SEEDS}
          guidance: [1, 7]
        outputs:
          - png
          - xyz_grid: {grid}
        """


def images_by_axes(out: Path) -> dict:
    """(seed, guidance) -> the item's PNG, from the manifest."""
    result = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line)
        axes = entry["item"]["axes"]
        (png,) = [f["path"] for f in entry["files"] if f["path"].endswith(".png")]
        result[(axes["seed"], axes["guidance"])] = out / png
    return result


def has_ink(image) -> bool:
    """True when the region holds anything but white."""
    return image.convert("L").getextrema()[0] < 200


def run(job: Path, out: Path, capsys) -> dict:
    code = main(["run", str(job), "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def grid_run(tiny_model, tmp_path_factory):
    """One run of the 3x2 sweep with a seed x guidance grid (rendered once for the module)."""
    root = tmp_path_factory.mktemp("grid")
    job = root / "job.yaml"
    job.write_text(textwrap.dedent(job_text(tiny_model, "{x: seed, y: guidance}")))
    out = root / "out"
    assert main(["run", str(job), "-o", str(out), "-q"]) == 0
    return job, out, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_grid_cells_are_the_items_images(grid_run):
    from PIL import Image

    _, out, summary = grid_run
    assert summary["rendered"] == 6
    (grid_path,) = summary["run_files"]
    assert grid_path.endswith(".png") and (out / grid_path).is_file()
    images = images_by_axes(out)
    assert len(images) == 6
    with Image.open(out / grid_path) as grid:
        grid = grid.convert("RGB")
    width, height = grid.size
    left, top = width - len(SEEDS) * CELL, height - len(GUIDANCES) * CELL
    assert left > 0 and top > 0, "label bands on the left and on top"
    for row, guidance in enumerate(GUIDANCES):
        for col, seed in enumerate(SEEDS):
            x0, y0 = left + col * CELL, top + row * CELL
            cell = grid.crop((x0, y0, x0 + CELL, y0 + CELL))
            with Image.open(images[(seed, guidance)]) as image:
                assert image.size == (CELL, CELL)
                assert cell.tobytes() == image.convert("RGB").tobytes(), f"cell ({row}, {col})"
    # Different items really differ, so the comparison above is not vacuous.
    with Image.open(images[(1, 1.0)]) as a, Image.open(images[(2, 1.0)]) as b:
        assert a.tobytes() != b.tobytes()


@pytest.mark.slow
def test_grid_labels_are_drawn(grid_run):
    from PIL import Image

    _, out, summary = grid_run
    with Image.open(out / summary["run_files"][0]) as grid:
        grid = grid.convert("RGB")
    width, height = grid.size
    left, top = width - len(SEEDS) * CELL, height - len(GUIDANCES) * CELL
    for col in range(len(SEEDS)):  # a label over every column
        assert has_ink(grid.crop((left + col * CELL, 0, left + (col + 1) * CELL, top))), f"column {col}"
    for row in range(len(GUIDANCES)):  # a label left of every row
        assert has_ink(grid.crop((0, top + row * CELL, left, top + (row + 1) * CELL))), f"row {row}"
    assert not has_ink(grid.crop((0, 0, left, top)))  # the corner stays blank


@pytest.mark.slow
def test_rerun_renders_nothing_and_rewrites_the_same_grid(grid_run, capsys):
    job, out, summary = grid_run
    grid = out / summary["run_files"][0]
    before = grid.read_bytes()
    again = run(job, out, capsys)
    assert (again["rendered"], again["already_done"]) == (0, 6)
    assert again["run_files"] == summary["run_files"]
    assert grid.read_bytes() == before


@pytest.mark.slow
def test_z_axis_gives_one_grid_per_value(grid_run, tiny_model, tmp_path, capsys):
    from PIL import Image

    _, out, _ = grid_run
    # Output settings do not change item ids: this job re-uses the module run's images.
    job = tmp_path / "z.yaml"
    job.write_text(textwrap.dedent(job_text(tiny_model, '{x: seed, z: guidance, path: "zgrids/{name}.png"}')))
    summary = run(job, out, capsys)
    assert summary["rendered"] == 0
    grids = summary["run_files"]
    assert len(grids) == len(GUIDANCES)
    assert len(set(grids)) == len(grids) and all(g.startswith("zgrids/") for g in grids)
    images = images_by_axes(out)
    for path, guidance in zip(grids, GUIDANCES):
        with Image.open(out / path) as grid:
            grid = grid.convert("RGB")
        width, height = grid.size
        assert width == len(SEEDS) * CELL  # no y axis: no left label band
        top = height - CELL
        assert top > 0 and has_ink(grid.crop((0, 0, width, top)))
        for col, seed in enumerate(SEEDS):
            with Image.open(images[(seed, guidance)]) as image:
                cell = grid.crop((col * CELL, top, (col + 1) * CELL, top + CELL))
                assert cell.tobytes() == image.convert("RGB").tobytes(), (path, col)


@pytest.mark.parametrize("grid, axis", [("{x: steps}", "steps"), ("{x: seed, y: sampler}", "sampler"),
                                        ("{x: seed, z: guidence}", "guidence")])
def test_grid_axis_must_be_a_sweep_axis(registry, write_job, tiny_model, grid, axis):
    path = write_job(job_text(tiny_model, grid))
    with pytest.raises(JobError) as info:
        load_job(path, registry)
    message = str(info.value)
    assert "outputs[1].xyz_grid: " in message
    assert f"'{axis}' is not a sweep axis of this job; axes: seed, guidance" in message


def test_grid_needs_an_image_writer(registry, write_job, tiny_model):
    path = write_job(f"""
        model: {tiny_model}
        sweep:
          seed: [1, 2]
        outputs:
          - xyz_grid: {{x: seed}}
        """)
    with pytest.raises(JobError, match=r"outputs\[0\]\.xyz_grid: needs an image writer"):
        load_job(path, registry)


def test_grid_path_template_is_checked(registry, write_job, tiny_model):
    path = write_job(job_text(tiny_model, '{x: seed, path: "../{name}.png"}'))
    with pytest.raises(JobError, match="escapes the output folder"):
        load_job(path, registry)


# ---------------------------------------------------------------- grids from stored cells (no rendering)
def grids_from_fake_cells(registry, write_job, tmp_path, body: str) -> list[str]:
    """Plan a job, store a small solid PNG per item as an image writer would, and run the grid writer."""
    import io

    from PIL import Image

    from sdbatch.output import Entry, OutputDir
    from sdbatch.run import RunContext, make_writers

    job = load_job(write_job(body), registry)
    context = RunContext(job, OutputDir(tmp_path / "out"), {}, "job")
    entries = []
    for item in job.plan:
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (item.index * 40 % 256, 90, 160)).save(buffer, "PNG")
        record = context.out.write_bytes(f"{item.id}.png", buffer.getvalue(), item.id, "png")
        entry = Entry(item.id, item.index, [{**record.to_json(), "image": True}], item.to_json())
        context.out.record(entry)
        entries.append(entry)
    (grid,) = [w for w in make_writers(job, context) if w.name == "xyz_grid"]
    return grid.finish(entries)


def test_prompt_axis_grid_from_stored_cells(registry, write_job, tiny_model, tmp_path):
    grids = grids_from_fake_cells(registry, write_job, tmp_path, f"""
        model: {tiny_model}
        sweep:
          prompt: ["a red circle", "a blue circle"]
          seed: [1, 2]
        outputs: [png, {{xyz_grid: {{x: prompt, y: seed}}}}]
        """)
    assert len(grids) == 1
    assert (tmp_path / "out" / grids[0]).is_file()


def test_zipped_x_axis_gives_one_grid(registry, write_job, tiny_model, tmp_path):
    grids = grids_from_fake_cells(registry, write_job, tmp_path, f"""
        model: {tiny_model}
        sweep:
          seed: [1, 2, 3]
          steps: [2, 3, 4]
        zip: [[seed, steps]]
        outputs: [png, {{xyz_grid: {{x: seed}}}}]
        """)
    assert len(grids) == 1


def test_z_values_with_a_common_prefix_get_their_own_grids(registry, write_job, tiny_model, tmp_path):
    grids = grids_from_fake_cells(registry, write_job, tmp_path, f"""
        model: {tiny_model}
        sweep:
          prompt: ["a very detailed photograph of a cat", "a very detailed photograph of a dog"]
          seed: [1, 2]
        outputs: [png, {{xyz_grid: {{x: seed, z: prompt}}}}]
        """)
    assert len(grids) == 2
    assert len(set(grids)) == 2, grids
