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


@pytest.fixture
def write_job(tmp_path):
    """Write a job file from YAML text (dedented) and return its path."""

    def write(text: str, name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write
