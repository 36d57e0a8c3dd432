"""Loaded models and the per-worker cache that loads each (model, device, dtype) once."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api import ModelInfo

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


@dataclass
class Model:
    """The components a render needs, already on their device."""

    info: ModelInfo
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: dict
    device: Any
    dtype: Any
    hash: str = ""  # A1111-style short sha256 of the weights
    extra: dict = field(default_factory=dict)  # components plugins add (ControlNets, ...)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        # The VAE's, not the U-Net's input: an inpainting U-Net takes 9 (latents, mask, masked image).
        return self.vae.config.latent_channels


def resolve_device(device: str) -> str:
    """'auto' becomes cuda when there is a GPU, then mps, else cpu."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str):
    """'auto' is float16 on CUDA (what SD checkpoints are tuned for), float32 elsewhere."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


_HASHES: dict = {}


def weights_hash(location: str | os.PathLike) -> str:
    """sha256 of a weight file, or of a folder's weight files in path order; A1111 shows 10 hex digits."""
    path = Path(location)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    key = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    if key not in _HASHES:
        digest = hashlib.sha256()
        for file in files:
            if len(files) > 1:
                digest.update(str(file.relative_to(path)).encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


class ModelCache:
    """Keeps the most recently used models loaded; loads happen once per key.

    ``capacity`` bounds memory: a model sweep on one worker swaps models instead of
    holding them all.
    """

    def __init__(self, registry, capacity: int = 1):
        self.registry = registry
        self.capacity = capacity
        self._models: OrderedDict = OrderedDict()
        self.loads = 0  # how many times weights were read (tests and reports use it)

    def get(self, info: ModelInfo, device: str, dtype: str) -> Model:
        key = (info.location, info.loader, device, dtype)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        while len(self._models) >= self.capacity:
            self._models.popitem(last=False)
        loader = self.registry.require("model_loader", info.loader).obj
        model = loader.load(info, device, dtype)
        self.loads += 1
        self._models[key] = model
        return model
