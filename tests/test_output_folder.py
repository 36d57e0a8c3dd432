"""`run` without -o: a folder per job; a folder holding another job's outputs is refused unless --add."""

from __future__ import annotations

import json
from pathlib import Path

from sdbatch.cli import main


def _job(write_job, model, name: str | None, prompt: str, filename: str) -> Path:
    named = f"name: {name}\n" if name else ""
    return write_job(f"{named}model: {model}\nprompt: {prompt}\nsteps: 2\nwidth: 64\nheight: 64\n"
                     "outputs: [png]\n", filename)


def _manifest_prompts(out: Path) -> list[str]:
    return [json.loads(line)["item"]["prompt"] for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_without_o_each_job_gets_its_own_folder(write_job, tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = _job(write_job, tiny_model, "squares", "a red square", "a.yaml")
    second = _job(write_job, tiny_model, None, "a blue circle", "circles.yaml")
    assert main(["run", str(first)]) == 0
    assert main(["run", str(second)]) == 0
    err = capsys.readouterr().err
    assert "output: out/squares" in err and "output: out/circles" in err
    assert _manifest_prompts(tmp_path / "out/squares") == ["a red square"]
    assert _manifest_prompts(tmp_path / "out/circles") == ["a blue circle"]
    assert (tmp_path / "out/squares/job.yaml").read_bytes() == first.read_bytes()


def test_another_jobs_folder_is_refused_unless_added_to(write_job, tiny_model, tmp_path, capsys):
    out = tmp_path / "shared"
    first = _job(write_job, tiny_model, "squares", "a red square", "a.yaml")
    second = _job(write_job, tiny_model, "circles", "a blue circle", "b.yaml")
    assert main(["run", str(first), "-o", str(out), "-q"]) == 0
    before = (out / "manifest.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["run", str(second), "-o", str(out), "-q"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"sdbatch: error: {out} holds the outputs of job 'squares' ({out}/job.yaml); give another folder "
        "with -o, or --add to add this job's outputs to it")
    assert (out / "manifest.jsonl").read_bytes() == before  # nothing written
    assert main(["run", str(second), "-o", str(out), "-q", "--add"]) == 0
    assert _manifest_prompts(out) == ["a red square", "a blue circle"]


def test_the_same_job_edited_resumes_into_its_folder(write_job, tiny_model, tmp_path):
    out = tmp_path / "out"
    job = _job(write_job, tiny_model, "squares", "a red square", "a.yaml")
    assert main(["run", str(job), "-o", str(out), "-q"]) == 0
    job.write_text(job.read_text().replace("prompt: a red square", "prompt: a red square, large"))
    assert main(["run", str(job), "-o", str(out), "-q"]) == 0
    assert _manifest_prompts(out) == ["a red square", "a red square, large"]


def test_an_unnamed_jobs_folder_is_refused_to_a_named_job(write_job, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(_job(write_job, tiny_model, None, "a red square", "a.yaml")), "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["run", str(_job(write_job, tiny_model, "circles", "a circle", "b.yaml")), "-o", str(out), "-q"]) == 1
    assert f"{out} holds the outputs of an unnamed job" in capsys.readouterr().err
