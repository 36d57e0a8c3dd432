"""Nothing is lost when a run is killed: kill -9 mid-run, resume, and compare with a clean run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ITEMS = 10


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in {".png", ".jpg"}
    }


def _run(job: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdbatch", "run", str(job), "-o", str(out), "-q"],
                          capture_output=True, text=True, timeout=300)


def _manifest_ids(out: Path) -> list[str]:
    lines = (out / "manifest.jsonl").read_text().splitlines()
    return [json.loads(line)["id"] for line in lines if line.strip()]


def test_kill_9_then_resume_matches_an_uninterrupted_run(write_job, tiny_model, tmp_path, kill_run_after):
    job = write_job(f"""
        model: {tiny_model}
        prompt: "a {{red|blue}} circle"
        steps: 4
        batch_size: 1
        sweep:
          seed: {{start: 1, count: {ITEMS // 2}}}
        outputs: [png, {{jpeg: {{path: "jpg/{{seed}}-{{id}}.jpg"}}}}]
    """)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert _run(job, clean).returncode == 0

    finished_before = kill_run_after(job, killed, finished=2)
    assert 2 <= finished_before < ITEMS

    resumed = _run(job, killed)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["already_done"] >= finished_before
    assert summary["rendered"] == ITEMS - summary["already_done"]

    assert _files(killed) == _files(clean)  # same names, byte-identical content
    ids = _manifest_ids(killed)
    assert len(ids) == len(set(ids)) == ITEMS  # no duplicates, nothing missing
    assert not [p for p in killed.rglob("*") if "sdbatch-tmp" in p.name]  # no partial files


def test_changed_job_renders_only_new_items_and_never_overwrites(write_job, tiny_model, tmp_path, capsys):
    from sdbatch.cli import main

    def _run(job, out):  # in-process: the kill test above covers the subprocess path
        code = main(["run", str(job), "-o", str(out), "-q"])
        return subprocess.CompletedProcess([], code, "", capsys.readouterr().err)

    out = tmp_path / "out"
    base = f"""
        model: {tiny_model}
        prompt: "a red circle"
        steps: 2
        outputs: [{{png: {{path: "{{seed}}.png"}}}}]
    """.rstrip(" ")
    first = write_job(base + "        sweep: {seed: [1, 2]}\n", "a.yaml")
    assert _run(first, out).returncode == 0
    before = _files(out)

    grown = write_job(base + "        sweep: {seed: [1, 2, 3]}\n", "b.yaml")
    result = _run(grown, out)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "summary.json").read_text())["rendered"] == 1
    after = _files(out)
    assert {k: after[k] for k in before} == before and set(after) == set(before) | {"3.png"}

    # Same path, different content (guidance changed): refused, the finished file is untouched.
    changed = write_job(base.replace("steps: 2", "steps: 2\n        guidance: 3") + "        sweep: {seed: [1]}\n",
                        "c.yaml")
    result = _run(changed, out)
    assert result.returncode != 0
    assert "refusing to overwrite" in result.stderr
    assert _files(out) == after


def test_a_writer_added_later_stores_finished_items_too(write_job, tiny_model, tmp_path):
    from sdbatch.cli import main

    out = tmp_path / "out"
    body = f"""
        model: {tiny_model}
        prompt: "a red circle"
        steps: 2
        sweep: {{seed: [1, 2]}}
    """.rstrip(" ")
    assert main(["run", str(write_job(body + "        outputs: [png]\n", "a.yaml")), "-o", str(out), "-q"]) == 0
    pngs = _files(out)
    assert main(["run", str(write_job(body + "        outputs: [png, jpeg]\n", "b.yaml")), "-o", str(out), "-q"]) == 0
    after = _files(out)
    assert len([k for k in after if k.endswith(".jpg")]) == 2
    assert {k: after[k] for k in pngs} == pngs  # the PNGs were re-stored with identical bytes
    ids = _manifest_ids(out)
    assert len(set(ids)) == 2
