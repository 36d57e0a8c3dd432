"""Shared fixtures: a fresh plugin registry, fake plugins, and tiny models built once per session."""

from __future__ import annotations

import os
import textwrap
import warnings
from pathlib import Path

import pytest

# Tests run on small tensors: one thread is as fast and leaves the other core free.
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture
def registry():
    """A registry built from the installed entry points (the built-ins and any installed plugin)."""
    from sdbatch.plugins import load_registry

    return load_registry()


@pytest.fixture
def make_registry():
    """Build a registry with extra plugin objects registered in code (entry points still load)."""
    from sdbatch.plugins import load_registry

    def make(*plugins, load_entrypoints: bool = True):
        return load_registry(plugins=plugins, load_entrypoints=load_entrypoints)

    return make


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random-initialised Stable Diffusion folder (diffusers layout) plus its single file."""
    import torch

    torch.set_num_threads(1)
    from sdbatch.testmodel import build_tiny_model

    folder = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_model(folder, seed=0, single_file=folder.parent / "tiny.safetensors")
    return folder


def _build_family(tmp_path_factory, family: str) -> Path:
    """Build one tiny family model (diffusers folder ``<root>/<family>``, single file ``<root>/<family>.safetensors``)."""
    import torch

    torch.set_num_threads(1)
    from sdbatch.testfamilies import BUILDERS

    root = tmp_path_factory.mktemp(f"tiny-{family}")
    return BUILDERS[family](root / family, seed=0, single_file=root / f"{family}.safetensors")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny random SDXL folder (diffusers layout, seed 0); its single file is ``tiny_sdxl_single_file``."""
    return _build_family(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_single_file(tiny_sdxl) -> Path:
    """``tiny_sdxl``'s weights as one SDXL-layout .safetensors (load with ``config=tiny_sdxl``)."""
    return tiny_sdxl.parent / "sdxl.safetensors"


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny random SD3.5-architecture folder (diffusers layout, seed 0, with T5)."""
    return _build_family(tmp_path_factory, "sd3")


@pytest.fixture(scope="session")
def tiny_sd3_single_file(tiny_sd3) -> Path:
    """``tiny_sd3``'s weights as one SD3-layout .safetensors with CLIP-L, CLIP-G and T5 (load with ``config=tiny_sd3``)."""
    return tiny_sd3.parent / "sd3.safetensors"


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A tiny random FLUX.1-dev-architecture folder (diffusers layout, seed 0)."""
    return _build_family(tmp_path_factory, "flux")


@pytest.fixture(scope="session")
def tiny_flux_single_file(tiny_flux) -> Path:
    """``tiny_flux``'s weights as one ComfyUI all-in-one FLUX .safetensors.

    diffusers 0.42's ``FluxPipeline.from_single_file`` cannot read its transformer at this width
    (it assumes FLUX's 3072); the VAE and text encoders load with ``config=tiny_flux``.
    """
    return tiny_flux.parent / "flux.safetensors"


@pytest.fixture
def write_job(tmp_path):
    """Write a job file from YAML text (dedented) and return its path."""

    def write(text: str, name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


@pytest.fixture
def kill_run_after():
    """Start `sdbatch run JOB -o OUT` in a subprocess and SIGKILL it once N items are finished."""
    import signal
    import subprocess
    import sys
    import time

    def run(job, out, finished: int, timeout: float = 120.0, args=(), env=None) -> int:
        process = subprocess.Popen([sys.executable, "-m", "sdbatch", "run", str(job), "-o", str(out), "-q", *args],
                                   env=env or {**os.environ, "OMP_NUM_THREADS": "1"},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        manifest, deadline = Path(out) / "manifest.jsonl", time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if manifest.is_file() and len(manifest.read_text().splitlines()) >= finished:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
        return sum(1 for line in manifest.read_text().splitlines() if _complete_json(line))

    return run


def _complete_json(line: str) -> bool:
    import json

    try:
        json.loads(line)
    except ValueError:
        return False  # a line the kill cut short: its item is not finished
    return True
