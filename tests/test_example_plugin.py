"""The example third-party plugin, for real: pip install, list, render with it, pip uninstall, clear error."""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sdbatch-colorgrade"
JOB = ROOT / "jobs" / "colorgrade.yaml"
PACKAGE = "sdbatch-colorgrade"


def _is_installed() -> bool:
    try:
        importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def pip(*args: str) -> None:
    """Run pip of this interpreter's environment, offline and quietly."""
    subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"], check=True,
                   capture_output=True, text=True, timeout=180)


def sdbatch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The sdbatch command line in a fresh process (it sees what pip changed, as a user's shell would)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SDBATCH_PROGRESS_INTERVAL": "3600"}
    env.pop("SDBATCH_LOAD_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "sdbatch", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def installed_example(tmp_path):
    """pip-install a copy of the example (no build/ left in the repo); always uninstall afterwards."""
    if _is_installed():
        pytest.skip(f"{PACKAGE} is already installed here; this test would uninstall it")
    source = tmp_path / "sdbatch-colorgrade"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".*"))
    try:
        pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(source))
        yield
    finally:
        pip("uninstall", "-y", PACKAGE)


def _job_on(model: Path, folder: Path) -> Path:
    """jobs/colorgrade.yaml on the tiny test model, 2 steps."""
    job = folder / "colorgrade.yaml"
    job.write_text(f"model: {model}\nsteps: 2\n" + JOB.read_text())
    return job


def _grey(path: Path) -> bool:
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())


@pytest.mark.slow
def test_install_list_run_uninstall(installed_example, tiny_model, tmp_path):
    # 1. `sdbatch plugins` lists both objects with the package and its version.
    listed = sdbatch("plugins", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(listed.stdout)}
    for key in (("postprocessor", "colorgrade"), ("writer", "catalogue")):
        assert rows[key]["plugin"] == "colorgrade"
        assert (rows[key]["package"], rows[key]["version"]) == (PACKAGE, "0.1.0")

    # 2. The job renders: 2 prompts x 2 seeds x saturation 1 and 0.
    job, out = _job_on(tiny_model, tmp_path), tmp_path / "out"
    ran = sdbatch("run", str(job), "-o", str(out), "--quiet", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 8

    # 3. The catalogue has a row per image, with the file's real sha256.
    with open(out / "colorgrade-catalogue.csv", newline="", encoding="utf-8") as handle:
        catalogue = list(csv.DictReader(handle))
    assert [row["id"] for row in catalogue] == [line["id"] for line in sorted(manifest, key=lambda m: m["index"])]
    for row in catalogue:
        assert hashlib.sha256((out / row["file"]).read_bytes()).hexdigest() == row["sha256"]
        assert row["size"] == "64x64" and row["steps"] == "2" and row["seed"] in ("1", "2")
    assert {row["prompt"].split()[2] for row in catalogue} == {"red", "blue"}

    # 4. Saturation 0 is exactly the greyscale of the same item graded with saturation 1.
    image_of = {(m["item"]["prompt"], m["item"]["seed"], m["item"]["axes"]["colorgrade.saturation"]):
                out / next(f["path"] for f in m["files"] if f.get("image")) for m in manifest}
    for (prompt, seed, saturation), path in image_of.items():
        assert _grey(path) == (saturation == 0), f"{path}: saturation {saturation}"
        if saturation == 0:
            colour = Image.open(image_of[(prompt, seed, 1)]).convert("L")
            assert (np.asarray(colour) == np.asarray(Image.open(path))[..., 0]).all()

    # 5. Uninstalled, the same job fails validation and says what is installed instead.
    pip("uninstall", "-y", PACKAGE)
    checked = sdbatch("validate", str(job), cwd=tmp_path)
    assert checked.returncode == 2
    # Line 12 of the job is jobs/colorgrade.yaml's `- colorgrade: ...` (two lines were prepended).
    line = next(line for line in checked.stderr.splitlines() if "postprocess[0]" in line)
    assert line.startswith(f"{job}:12:5: postprocess[0].colorgrade: unknown postprocessor 'colorgrade'; installed: ")
    assert "resize" in line.split("installed: ")[1]
    assert "outputs[1].catalogue: unknown writer 'catalogue'" in checked.stderr
