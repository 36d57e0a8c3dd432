"""Loaded models and the per-worker cache that loads each (model, device, dtype) once."""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api import ModelInfo

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
#: Prompt conditionings kept per model (sweeps repeat prompts; a bound keeps memory flat).
PROMPT_CACHE_LIMIT = 4096


@dataclass
class Model:
    """A family plus its named components, already on their device.

    Components are attributes: ``model.unet``, ``model.transformer``, ``model.vae``,
    ``model.text_encoder_2`` ... (whatever the family's pipeline has).
    """

    info: ModelInfo
    family: Any
    components: dict
    scheduler_config: dict
    device: Any
    dtype: Any
    hash: str = ""  # A1111-style short sha256 of the weights
    extra: dict = field(default_factory=dict)  # what plugins attach (ControlNets, caches, LoRAs ...)

    def __getattr__(self, name: str):
        components = self.__dict__.get("components") or {}
        if name in components:
            return components[name]
        raise AttributeError(f"{type(self).__name__} of family {self.__dict__.get('family')!r} has no {name!r}")

    @property
    def denoiser(self):
        """The U-Net or transformer."""
        return self.components.get("unet") or self.components.get("transformer")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        # The VAE's, not the U-Net's input: an inpainting U-Net takes 9 (latents, mask, masked image).
        return self.vae.config.latent_channels

    @property
    def cache_key(self) -> str:
        """What was loaded: the weights plus everything plugins changed (LoRAs); per-model caches use it."""
        return json.dumps([self.info.location, self.hash, self.extra.get("modifiers", [])], sort_keys=True)

    def encode_prompt(self, text: str, **options):
        """The family's conditioning of one prompt (name -> tensor), cached per model and options."""
        return self.encode_prompts([text], **options)[0]

    def encode_prompts(self, texts, **options) -> list:
        """The conditionings of several prompts, cached per model, prompt and options; the ones not
        cached go to the family in one ``encode_prompts`` call (a GPU encodes them together)."""
        cache = self.extra.setdefault("prompt_cache", OrderedDict())
        settings = json.dumps(options, sort_keys=True)
        keys = [(self.cache_key, text, settings) for text in texts]
        missing = list(dict.fromkeys(text for key, text in zip(keys, texts) if key not in cache))
        if missing:
            import torch

            with torch.inference_mode():
                encoded = self.family.encode_prompts(self, missing, options)
            cache.update(((self.cache_key, text, settings), result) for text, result in zip(missing, encoded))
        results = [cache[key] for key in keys]
        for key in keys:
            cache.move_to_end(key)
        while len(cache) > PROMPT_CACHE_LIMIT:
            cache.popitem(last=False)
        return results


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
    holding them all. The key holds what was asked for (location, family, memory options),
    so a model loaded with other settings is never reused by mistake.
    """

    def __init__(self, registry, capacity: int = 1):
        self.registry = registry
        self.capacity = capacity
        self._models: OrderedDict = OrderedDict()
        self._failed: dict = {}  # key -> message: a model that failed to load fails its other items at once
        self.loads = 0  # how many times weights were read (tests and reports use it)

    def get(self, info: ModelInfo, device: str, dtype: str) -> Model:
        key = (info.location, info.loader, info.family, json.dumps(info.memory, sort_keys=True), device, dtype)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        if key in self._failed:
            raise RuntimeError(self._failed[key])
        while len(self._models) >= self.capacity:
            self._models.popitem(last=False)
        loader = self.registry.require("model_loader", info.loader).obj
        family = self.registry.require("family", info.family or "sd1").obj
        try:
            model = loader.load(info, device, dtype, family)
        except (OSError, ValueError, RuntimeError) as exc:
            self._failed[key] = f"model '{info.ref}' failed to load: {type(exc).__name__}: {exc}"
            raise RuntimeError(self._failed[key]) from exc
        family.prepare(model)
        if self.registry.pm is not None:
            self.registry.pm.hook.prepare_model(model=model)
        self.loads += 1
        self._models[key] = model
        return model


# ---------------------------------------------------------------- family detection (no weights read)
def safetensors_keys(path: str | os.PathLike, limit: int = 64 << 20) -> list[str]:
    """Tensor names of a .safetensors file, from its JSON header alone.

    Raises ValueError for a file that is not safetensors (a renamed pickle, say)."""
    import struct

    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size <= 1 or size > limit:
            raise ValueError(f"{path} is not a safetensors file (no valid header; a renamed pickle?)")
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON; a renamed pickle?)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a table)")
    return [key for key in header if key != "__metadata__"]


def hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub model (the one refs/main names), or None."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    root = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    ref = root / "refs" / "main"
    if ref.is_file():
        folder = root / "snapshots" / ref.read_text().strip()
        if folder.is_dir():
            return folder
    snapshots = sorted((root / "snapshots").glob("*")) if (root / "snapshots").is_dir() else []
    return snapshots[-1] if snapshots else None


def detect_family(registry, info: ModelInfo) -> str | None:
    """The family of a described model, from model_index.json's pipeline class or a single file's keys."""
    families = [entry.obj for entry in registry.entries.get("family", {}).values()]
    location = Path(info.location)
    folder = hub_snapshot(info.location) if info.kind == "hub" else location
    if folder is not None and (folder / "model_index.json").is_file():
        try:
            pipeline = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
        except (OSError, ValueError):
            return None
        return next((f.name for f in families if pipeline in f.pipeline_classes), None)
    if location.is_file() and location.suffix.lower() == ".safetensors":
        keys = safetensors_keys(location)
        return next((f.name for f in families if f.matches_keys(keys)), None)
    return None
