"""Error messages for bad job files: file, line, column and key path, every problem at once, exit code 2.

Each case writes a job file, runs ``sdbatch validate`` in-process and looks for
``FILE:LINE:COLUMN: KEY.PATH: message`` on stderr. Lines and columns are computed from
the YAML text itself (where the offending key or value starts), not from the code.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from sdbatch.cli import main
from sdbatch.errors import EXIT_INVALID_JOB


def position(text: str, needle: str, occurrence: int = 0) -> tuple[int, int]:
    """1-based (line, column) where the ``occurrence``-th ``needle`` starts in ``text``."""
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(needle, start + 1)
    line = text.count("\n", 0, start) + 1
    column = start - (text.rfind("\n", 0, start) + 1) + 1
    return line, column


@pytest.fixture
def job(tmp_path, tiny_model):
    """Write a job (``{model}`` is replaced by the tiny model folder) and return (path, text)."""

    def write(body: str, name: str = "job.yaml") -> tuple[Path, str]:
        text = textwrap.dedent(body).lstrip("\n").replace("{model}", str(tiny_model))
        path = tmp_path / name
        path.write_text(text)
        return path, text

    return write


def validate(path: Path, capsys) -> tuple[int, str]:
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    return code, captured.err


def assert_problem(err: str, path: Path, text: str, needle: str, keypath: str, *fragments: str,
                   occurrence: int = 0) -> str:
    """The line reporting ``keypath`` at ``needle``'s position, checked for each fragment."""
    line, column = position(text, needle, occurrence)
    prefix = f"{path}:{line}:{column}: {keypath}: "
    matching = [row for row in err.splitlines() if row.startswith(prefix)]
    assert matching, f"no problem starting with {prefix!r} in:\n{err}"
    row = matching[0]
    for fragment in fragments:
        assert fragment in row, f"{fragment!r} missing from {row!r}"
    return row


# (id, job body, needle where the problem is, key path, fragments of the message)
CASES = [
    ("duplicate-key", """
        model: {model}
        steps: 3
        steps: 4
        """, "steps: 4", "steps", ["duplicate key 'steps'"]),
    ("unknown-top-level-key", """
        model: {model}
        guidence: 7
        """, "guidence", "guidence", ["unknown key 'guidence'", "did you mean 'guidance'?"]),
    ("wrong-type", """
        model: {model}
        steps: "twenty"
        """, "steps", "steps", ["expected an integer", "'twenty'"]),
    ("guidance-negative", """
        model: {model}
        guidance: -1
        """, "guidance", "guidance", ["at least 0", "-1"]),
    ("seed-too-large", """
        model: {model}
        seed: 4294967296
        """, "seed", "seed", ["at most 4294967295", "4294967296"]),
    ("width-not-multiple-of-8", """
        model: {model}
        width: 100
        """, "width", "width", ["multiple of 8", "100"]),
    ("unknown-writer", """
        model: {model}
        outputs: [pngg]
        """, "pngg", "outputs[0]", ["unknown writer 'pngg'", "did you mean 'png'?", "installed:",
                                    "png", "jpeg", "webp", "xyz_grid"]),
    ("unknown-postprocessor", """
        model: {model}
        postprocess:
          - resizer
        """, "resizer", "postprocess[0]", ["unknown postprocessor 'resizer'", "did you mean 'resize'?",
                                           "installed:", "resize", "watermark"]),
    ("unknown-plugin-option", """
        model: {model}
        outputs:
          - png: {qualty: 90}
        """, "qualty", "outputs[0].png.qualty", ["unknown key 'qualty'", "known keys: path"]),
    ("unknown-postprocessor-option", """
        model: {model}
        postprocess:
          - resize: {scael: 2}
        """, "scael", "postprocess[0].resize.scael", ["unknown key 'scael'", "did you mean 'scale'?"]),
    ("bad-sweep-axis", """
        model: {model}
        sweep:
          guidanse: [1, 2]
        """, "guidanse", "sweep.guidanse", ["unknown sweep axis 'guidanse'", "did you mean 'guidance'?"]),
    ("sweep-value-type", """
        model: {model}
        sweep:
          guidance: ["high"]
        """, '"high"', "sweep.guidance[0]", ["expected a number", "'high'"]),
    ("sweep-not-a-list", """
        model: {model}
        sweep:
          steps: 3
        """, "steps", "sweep.steps", ["expected a non-empty list"]),
    ("zip-unequal", """
        model: {model}
        sweep:
          seed: [1, 2, 3]
          steps: [2, 3]
        zip:
          - [seed, steps]
        """, "[seed, steps]", "zip[0]", ["same length", "seed: 3", "steps: 2"]),
    ("zip-not-an-axis", """
        model: {model}
        sweep:
          seed: [1, 2]
        zip:
          - [seed, sede]
        """, "sede", "zip[0][1]", ["'sede' is not a sweep axis", "did you mean 'seed'?"]),
    ("missing-model-file", """
        model: missing.safetensors
        """, "model", "model", ["not found", "missing.safetensors"]),
    ("missing-wildcards-folder", """
        model: {model}
        wildcards: no-such-folder
        """, "wildcards", "wildcards", ["folder not found", "no-such-folder"]),
    ("path-template-parent", """
        model: {model}
        outputs:
          - png: {path: "../x/{id}.png"}
        """, "png", "outputs[0].png", ["escapes the output folder"]),
    ("path-template-absolute", """
        model: {model}
        outputs:
          - png: {path: "/tmp/x/{id}.png"}
        """, "png", "outputs[0].png", ["escapes the output folder"]),
    ("path-template-unknown-field", """
        model: {model}
        outputs:
          - jpeg: {path: "{idd}.jpg"}
        """, "jpeg", "outputs[0].jpeg", ["unknown field '{idd}'", "did you mean 'id'?"]),
    ("bad-prompt-template", """
        model: {model}
        prompt: "a {red|blue"
        """, "prompt", "prompt", ["bad prompt template", "a {red|blue"]),
    ("missing-wildcard", """
        model: {model}
        prompt: "a __colour__ cat"
        """, "prompt", "prompt", ["wildcard 'colour' not found"]),
    ("missing-wildcard-in-sweep", """
        model: {model}
        sweep:
          prompt: ["plain", "a __colour__ cat"]
        """, '"a __colour__', "sweep.prompt[1]", ["wildcard 'colour' not found"]),
    ("unknown-dtype", """
        model: {model}
        dtype: float8
        """, "dtype", "dtype", ["expected one of", "'float16'"]),
    ("grid-axis-not-swept", """
        model: {model}
        sweep:
          seed: [1, 2]
        outputs:
          - png
          - xyz_grid: {x: guidance}
        """, "xyz_grid", "outputs[1].xyz_grid", ["'guidance' is not a sweep axis", "seed"]),
]


@pytest.mark.parametrize("body, needle, keypath, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_job_is_reported_with_file_line_column_and_key_path(job, capsys, body, needle, keypath, fragments):
    path, text = job(body)
    code, err = validate(path, capsys)
    assert code == EXIT_INVALID_JOB == 2
    assert err.startswith(f"{path}: 1 problem found"), err
    assert_problem(err, path, text, needle, keypath, *fragments)


def test_invalid_yaml_syntax(job, capsys):
    path, text = job("""
        steps: 3
        prompt: a: b
        """)
    code, err = validate(path, capsys)
    assert code == 2
    # The second ':' on line 2 is where PyYAML gives up.
    line, column = 2, text.splitlines()[1].index(": b") + 1
    assert f"{path}:{line}:{column}: (top level): invalid YAML" in err
    assert "Traceback" not in err


def test_unclosed_flow_sequence(job, capsys):
    path, text = job("""
        steps: 3
        sweep:
          seed: [1, 2
        width: 64
        """)
    code, err = validate(path, capsys)
    assert code == 2
    assert f"{path}:" in err and "invalid YAML" in err and "']'" in err
    assert "Traceback" not in err


def test_missing_job_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    code, err = validate(path, capsys)
    assert code == 2
    assert f"{path}" in err and "file not found" in err


@pytest.mark.parametrize("misspelt", ["Eulr a", "Euler A"])
def test_unknown_sampler_is_located_and_lists_the_installed(job, capsys, misspelt):
    path, text = job(f"""
        model: {{model}}
        sampler: {misspelt}
        """)
    code, err = validate(path, capsys)
    assert code == 2
    row = assert_problem(err, path, text, "sampler", "sampler", f"unknown sampler '{misspelt}'", "did you mean",
                         "installed: Euler a, Euler,")
    assert "DPM++ 2M Karras" in row


@pytest.mark.parametrize("misspelt", ["Eulr a", "Euler A"])
def test_unknown_sampler_suggests_the_real_name(job, capsys, misspelt):
    path, text = job(f"""
        model: {{model}}
        sampler: {misspelt}
        """)
    _, err = validate(path, capsys)
    assert "did you mean 'Euler a'?" in err


def test_sweep_sampler_values_are_checked(job, capsys):
    path, text = job("""
        model: {model}
        sweep:
          sampler: [Euler a, DPM++ 2N Karras]
        """)
    code, err = validate(path, capsys)
    assert code == 2
    assert_problem(err, path, text, "DPM++ 2N", "sweep.sampler[1]", "unknown sampler 'DPM++ 2N Karras'")


def test_pickle_checkpoint_refused_unless_allowed(job, tmp_path, capsys):
    (tmp_path / "dummy.ckpt").write_bytes(b"not really a pickle")
    path, text = job("""
        model: dummy.ckpt
        """)
    code, err = validate(path, capsys)
    assert code == 2
    assert_problem(err, path, text, "model", "model", "dummy.ckpt is a pickle checkpoint", "allow_pickle: true")

    path, text = job("""
        model: dummy.ckpt
        allow_pickle: true
        """)
    code, err = validate(path, capsys)
    assert code == 0, err
    assert capsys.readouterr().err == ""


def test_every_problem_of_a_file_is_reported_together(job, capsys):
    path, text = job("""
        model: {model}
        steps: "twenty"
        guidance: -1
        outputs: [pngg]
        """)
    code, err = validate(path, capsys)
    assert code == 2
    assert err.startswith(f"{path}: 3 problems found")
    rows = [row for row in err.splitlines() if row.startswith(f"{path}:") and "problems found" not in row]
    assert len(rows) == 3
    assert_problem(err, path, text, "steps", "steps", "expected an integer")
    assert_problem(err, path, text, "guidance", "guidance", "at least 0")
    assert_problem(err, path, text, "pngg", "outputs[0]", "unknown writer 'pngg'")
    # In file order.
    assert [row.split(":")[1] for row in rows] == ["2", "3", "4"]


def test_several_files_are_validated_in_one_call(job, capsys):
    good, _ = job("""
        model: {model}
        sweep:
          seed: [1, 2, 3]
        """, name="good.yaml")
    bad, _ = job("""
        model: {model}
        width: 100
        """, name="bad.yaml")
    code = main(["validate", str(good), str(bad)])
    captured = capsys.readouterr()
    assert code == 2
    assert f"{good}: ok, 3 items" in captured.out
    assert f"{bad}:2:1: width: must be a multiple of 8" in captured.err


def test_validate_writes_nothing(job, tmp_path, capsys, monkeypatch):
    path, _ = job("""
        model: {model}
        prompt: a red circle
        sweep:
          seed: [1, 2]
        outputs: [png, jpeg]
        """)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    mtime = os.stat(tmp_path).st_mtime_ns
    code = main(["validate", str(path)])
    assert code == 0, capsys.readouterr().err
    assert f"{path}: ok, 2 items" in capsys.readouterr().out
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before
    assert not (tmp_path / "out").exists()
    assert os.stat(tmp_path).st_mtime_ns == mtime


def test_writer_problem_names_its_own_index_after_an_invalid_entry(job, capsys):
    path, text = job("""
        model: {model}
        outputs:
          - pngx
          - png: {path: "../{id}.png"}
        """)
    code, err = validate(path, capsys)
    assert code == 2
    assert_problem(err, path, text, "png:", "outputs[1].png", "escapes the output folder")


def test_relative_paths_resolve_against_a_suffixless_job_file(tmp_path, tiny_model, monkeypatch, capsys):
    folder = tmp_path / "jobs"
    (folder / "wild").mkdir(parents=True)
    (folder / "wild" / "colour.txt").write_text("red\nblue\n")
    path = folder / "render"  # no .yaml suffix
    path.write_text(f"model: {tiny_model}\nwildcards: wild\nprompt: 'a __colour__ cat'\n")
    monkeypatch.chdir(tmp_path)
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"{path}: ok, 2 items" in captured.out


def test_path_template_with_a_bad_format_spec_is_a_validation_error(job, capsys):
    path, text = job("""
        model: {model}
        outputs:
          - png: {path: "{seed:q}.png"}
        """)
    code, err = validate(path, capsys)
    assert code == 2
    assert_problem(err, path, text, "png", "outputs[0].png", "{seed:q}")


def test_size_sweep_values_are_range_checked(job, capsys):
    path, text = job("""
        model: {model}
        sweep:
          size: ["64x60", "0x0", "64x64"]
        """)
    code, err = validate(path, capsys)
    assert code == 2
    assert_problem(err, path, text, '"64x60"', "sweep.size[0]", "multiple of 8")
    assert_problem(err, path, text, '"0x0"', "sweep.size[1]")
