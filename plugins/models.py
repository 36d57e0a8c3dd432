"""Built-in model loaders: sdbatch-tiny by name, a diffusers folder, a single file, a hub id."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sdbatch import hookimpl
from sdbatch.api import ModelInfo, ModelLoader, ModelRequest
from sdbatch.inputs import HUB_ID

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SINGLE_FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES


def read_defaults(folder: Path) -> dict:
    """Recommended settings a model folder ships in sdbatch.json (width, height, steps, ...)."""
    path = folder / "sdbatch.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    keys = ("width", "height", "steps", "guidance", "sampler")
    return {k: data[k] for k in keys if k in data}


def _resolve(ref: str, folder: str) -> Path:
    path = Path(ref).expanduser()
    return path if path.is_absolute() else Path(folder) / path


def quiet_libraries() -> None:
    """Keep library chatter (load progress bars, optional-dependency notes) out of sdbatch's output."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated.*")
    warnings.filterwarnings("ignore", message=".*TF32 acceleration on top of oneDNN.*")


def load_pipeline(info: ModelInfo, device: str, dtype: str, family, single_file: bool = False):
    """Load a model with its family's diffusers pipeline class (folder, hub id or single file)."""
    quiet_libraries()
    import diffusers

    from sdbatch.models import resolve_dtype

    torch_dtype = resolve_dtype(dtype, device)
    pipeline = getattr(diffusers, family.pipeline)
    kwargs = {"torch_dtype": torch_dtype, **family.load_kwargs(info.memory)}
    if single_file:
        config = info.config or shipped_config(family)
        if config:
            kwargs.update(config=config, local_files_only=True)
        pipe = pipeline.from_single_file(info.location, **kwargs)
    else:
        pipe = pipeline.from_pretrained(
            info.location, use_safetensors=None if info.allow_pickle else True,
            local_files_only=info.kind != "hub" or bool(os.environ.get("HF_HUB_OFFLINE")), **kwargs)
    return _model_from_pipeline(info, family, pipe, device, torch_dtype)


def apply_memory(pipe, memory: dict, device: str) -> bool:
    """The job's memory options on a loaded pipeline; True when it was offloaded (it places itself)."""
    vae = getattr(pipe, "vae", None)
    if memory.get("vae_tiling") and vae is not None:
        vae.enable_tiling()
    if memory.get("vae_slicing") and vae is not None:
        vae.enable_slicing()
    offload = memory.get("offload", "none")
    if offload == "none" or not str(device).startswith("cuda"):
        return False  # offloading moves weights between CPU and GPU: on a CPU it has nothing to do
    if offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.enable_model_cpu_offload(device=device)
    return True


def shipped_config(family) -> str | None:
    """The config folder sdbatch ships for a family's single files (no hub needed), if any."""
    if not family.config_folder:
        return None
    import sdbatch

    folder = Path(sdbatch.__file__).resolve().parent / "configs" / family.config_folder
    return str(folder) if folder.is_dir() else None


def _model_from_pipeline(info: ModelInfo, family, pipe, device: str, torch_dtype):
    from sdbatch.models import Model, weights_hash

    if not apply_memory(pipe, info.memory, device):
        pipe.to(device)
    components = {name: getattr(pipe, name, None) for name in family.components}
    for module in components.values():
        if hasattr(module, "parameters"):
            module.eval().requires_grad_(False)
            _own_aligned_memory(module)
    if info.memory.get("tiny_vae"):
        components["decoder"] = load_tiny_vae(info.memory["tiny_vae"], device, torch_dtype)
    location = Path(info.location)
    digest = weights_hash(location) if location.exists() else ""
    return Model(info=info, family=family, components=components, scheduler_config=dict(pipe.scheduler.config),
                 device=device, dtype=torch_dtype, hash=digest[:10])


def load_tiny_vae(ref: str, device: str, torch_dtype):
    """An ``AutoencoderTiny`` (TAESD) decoder from a diffusers folder or a hub id (the cache when offline)."""
    import os

    from diffusers import AutoencoderTiny

    quiet_libraries()
    path = Path(ref).expanduser()
    if path.is_dir():
        decoder = AutoencoderTiny.from_pretrained(str(path), torch_dtype=torch_dtype, use_safetensors=True)
    elif HUB_ID.fullmatch(ref) and not path.exists():
        decoder = AutoencoderTiny.from_pretrained(ref, torch_dtype=torch_dtype, use_safetensors=True,
                                                  local_files_only=bool(os.environ.get("HF_HUB_OFFLINE")))
    else:
        raise ValueError(f"tiny_vae {ref}: expected an AutoencoderTiny folder (config.json and safetensors) "
                         f"or a hub id such as madebyollin/taesd")
    decoder = decoder.to(device).eval().requires_grad_(False)
    _own_aligned_memory(decoder)
    return decoder


def _own_aligned_memory(module) -> None:
    """Give every weight its own freshly allocated (64-byte aligned) storage.

    Weights loaded from a memory-mapped file can start at any byte offset, and CPU BLAS
    takes different code paths for unaligned data: the same weights would then give
    different low bits depending on how they were loaded (folder or single file).
    """
    for tensor in list(module.parameters()) + list(module.buffers()):
        tensor.data = tensor.data.clone()


class TinyLoader(ModelLoader):
    """``sdbatch-tiny``: the small model the project trains and ships (the default)."""

    name = "sdbatch-tiny"
    description = "the offline default model shipped inside sdbatch"

    def describe(self, request: ModelRequest) -> ModelInfo | None:
        if request.ref != "sdbatch-tiny":
            return None
        from sdbatch.tiny import model_path

        folder = model_path()
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"sdbatch-tiny is not present at {folder}; reinstall sdbatch or see README.md")
        return ModelInfo(request.ref, str(folder), "diffusers-folder", defaults=read_defaults(folder))

    def load(self, info: ModelInfo, device: str, dtype: str, family):
        return load_pipeline(info, device, dtype, family)


class FolderLoader(ModelLoader):
    """A local diffusers folder (with model_index.json)."""

    name = "diffusers-folder"
    description = "a local folder in the diffusers layout"

    def describe(self, request: ModelRequest) -> ModelInfo | None:
        path = _resolve(request.ref, request.folder)
        if not path.is_dir():
            return None
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{path} is a folder but has no model_index.json (not a diffusers model)")
        if not request.allow_pickle and not any(path.rglob("*.safetensors")):
            raise ValueError(f"{path} has no .safetensors weights; pickle weights run code when loaded, "
                             "set allow_pickle: true if you trust them")
        return ModelInfo(request.ref, str(path), "diffusers-folder", defaults=read_defaults(path),
                         allow_pickle=request.allow_pickle)

    def load(self, info: ModelInfo, device: str, dtype: str, family):
        return load_pipeline(info, device, dtype, family)


class SingleFileLoader(ModelLoader):
    """One checkpoint file (.safetensors; .ckpt only with allow_pickle) as A1111 users keep them."""

    name = "single-file"
    description = "a single-file checkpoint in the original (LDM) layout"

    def describe(self, request: ModelRequest) -> ModelInfo | None:
        if not request.ref.lower().endswith(SINGLE_FILE_SUFFIXES):
            return None
        path = _resolve(request.ref, request.folder)
        if not path.is_file():
            raise ValueError(f"model file not found: {request.ref} (looked for {path})")
        if path.suffix.lower() in PICKLE_SUFFIXES and not request.allow_pickle:
            raise ValueError(f"{path.name} is a pickle checkpoint, which can run arbitrary code when loaded; "
                             "convert it to .safetensors, or set allow_pickle: true if you trust it")
        config, defaults = request.config, {}
        if config and _resolve(config, request.folder).is_dir():
            config = str(_resolve(config, request.folder))
            defaults = read_defaults(Path(config))  # the config folder's recommended settings
        return ModelInfo(request.ref, str(path), "single-file", allow_pickle=request.allow_pickle,
                         config=config, defaults=defaults)

    def load(self, info: ModelInfo, device: str, dtype: str, family):
        return load_pipeline(info, device, dtype, family, single_file=True)


class HubLoader(ModelLoader):
    """A Hugging Face hub id (``org/name``): from the local cache, or downloaded when the hub is reachable."""

    name = "hub"
    description = "a Hugging Face hub id, from the local cache when offline"

    def describe(self, request: ModelRequest) -> ModelInfo | None:
        if not HUB_ID.fullmatch(request.ref) or _resolve(request.ref, request.folder).exists():
            return None
        from sdbatch.models import hub_snapshot

        if hub_snapshot(request.ref) is None:
            reason = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else _hub_unreachable(request.ref)
            if reason:
                raise ValueError(
                    f"hub model '{request.ref}' is not in the local cache and cannot be downloaded ({reason}); "
                    f"on a connected machine run `hf download {request.ref}` (or `huggingface-cli download "
                    f"{request.ref}`) and copy the cache here, or give a local folder or .safetensors file")
        return ModelInfo(request.ref, request.ref, "hub", allow_pickle=request.allow_pickle)

    def load(self, info: ModelInfo, device: str, dtype: str, family):
        return load_pipeline(info, device, dtype, family)


def _hub_unreachable(repo_id: str) -> str:
    """Why the hub cannot serve ``repo_id`` now (a few seconds at most), or an empty string."""
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo_id, timeout=5)
    except Exception as exc:  # offline, DNS, 401/404: all mean "not downloadable from here"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no answer'}"
    return ""


class RandomFamilyLoader(ModelLoader):
    """``sdbatch-random-<family>`` (sd1, sdxl, sd3, flux): tiny random-weight models of each architecture.

    For trying a family's plumbing offline (jobs/sdxl.yaml ...): the pictures are noise, the
    code path is the real one. Built on first load into ``$SDBATCH_CACHE`` (default
    ``~/.cache/sdbatch``), deterministically from seed 0; planning reads nothing.
    """

    name = "random-family"
    description = "tiny random-weight models of each family, built offline on first use"
    prefix = "sdbatch-random-"

    def describe(self, request: ModelRequest) -> ModelInfo | None:
        if not request.ref.startswith(self.prefix):
            return None
        family = request.ref[len(self.prefix):]
        from sdbatch.testfamilies import SDBATCH_DEFAULTS
        from sdbatch.testmodel import SDBATCH_DEFAULTS as SD1_DEFAULTS

        defaults = {"sd1": SD1_DEFAULTS, **SDBATCH_DEFAULTS}
        if family not in defaults:
            raise ValueError(f"unknown random model '{request.ref}': use one of "
                             + ", ".join(self.prefix + name for name in defaults))
        folder = random_model_folder(family)
        info = ModelInfo(request.ref, str(folder), "diffusers-folder", defaults=dict(defaults[family]))
        info.family = family
        return info

    def load(self, info: ModelInfo, device: str, dtype: str, family):
        folder = Path(info.location)
        if not (folder / "model_index.json").is_file():
            _build_random_model(info.ref[len(self.prefix):], folder)
        return load_pipeline(info, device, dtype, family)


def random_model_folder(family: str) -> Path:
    cache = Path(os.environ.get("SDBATCH_CACHE") or Path.home() / ".cache" / "sdbatch")
    return cache / f"random-{family}-seed0"


def _build_random_model(family: str, folder: Path) -> None:
    """Build into a temporary folder, then rename: parallel workers never see half a model."""
    import shutil
    import tempfile

    from sdbatch.testfamilies import BUILDERS
    from sdbatch.testmodel import build_tiny_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    (build_tiny_model if family == "sd1" else BUILDERS[family])(temp / "model")
    try:
        os.rename(temp / "model", folder)
    except OSError:  # another worker finished first
        pass
    shutil.rmtree(temp, ignore_errors=True)


@hookimpl(trylast=True)
def register_model_loaders(register):
    """Built-in loaders, asked after any a plugin adds."""
    for loader in (TinyLoader(), RandomFamilyLoader(), FolderLoader(), SingleFileLoader(), HubLoader()):
        register(loader)
