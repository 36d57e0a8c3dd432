"""A1111's "extra networks" on disk: LoRA files named in prompts, textual-inversion embeddings,
and the short hashes Civitai reads from an image's ``Lora hashes`` and ``TI hashes`` fields.

Names are file stems, as in A1111: ``<lora:watercolor:0.8>`` is ``lora_dir/**/watercolor.safetensors``
and the word ``easynegative`` in a prompt is ``embeddings/easynegative.safetensors``. Pickles
(.pt, .bin, .ckpt) are refused unless ``allow_pickle``. Torch is imported only to read tensors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from sdbatch.errors import SdbatchError, did_you_mean

from .prompts import embedding_token, embedding_words, extract_networks, loras_in

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")
SDXL_PARTS = ("clip_l", "clip_g")  # SDXL embedding files hold one vector set per text encoder


class NetworkError(SdbatchError):
    """A LoRA or embedding that cannot be found or read; the message names it and the folder."""

    exit_code = 2


# ---------------------------------------------------------------------------------------------
# Finding files by name


def network_files(folder: str | Path, allow_pickle: bool = False) -> dict[str, list[Path]]:
    """Every usable file under ``folder`` by stem (A1111 searches subfolders too); .safetensors first."""
    suffixes = SAFE_SUFFIXES + (PICKLE_SUFFIXES if allow_pickle else ())
    found: dict[str, list[Path]] = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower() in suffixes and path.is_file():
            found.setdefault(path.stem, []).append(path)
    for paths in found.values():
        paths.sort(key=lambda p: p.suffix.lower() not in SAFE_SUFFIXES)
    return found


def find_network(name: str, folder: str | Path, kind: str, allow_pickle: bool = False) -> Path:
    """The file a name means in ``folder``; a `NetworkError` with close matches when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NetworkError(f"{kind} folder {folder} does not exist (looking for '{name}')")
    files = network_files(folder, allow_pickle)
    if name in files:
        safe = [p for p in files[name] if p.suffix.lower() in SAFE_SUFFIXES]
        if len(safe) > 1:
            shown = ", ".join(str(p.relative_to(folder)) for p in safe)
            raise NetworkError(f"{kind} '{name}' is ambiguous in {folder}: {shown}")
        return files[name][0]
    pickles = [p for p in folder.rglob(f"{name}.*") if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise NetworkError(f"{kind} '{name}' is a pickle ({pickles[0].name}), which can run code when loaded; "
                           "set allow_pickle: true if you trust it")
    hint = did_you_mean(name, files) or (f"; {folder} has none" if not files else "")
    raise NetworkError(f"unknown {kind} '{name}' in {folder}{hint}")


def find_lora(name: str, lora_dir: str | Path, allow_pickle: bool = False) -> Path:
    """The file of ``<lora:name:...>`` in ``lora_dir``."""
    return find_network(name, lora_dir, "LoRA", allow_pickle)


def find_embedding(name: str, embeddings_dir: str | Path, allow_pickle: bool = False) -> Path:
    """The file of the embedding ``name`` in ``embeddings_dir``."""
    return find_network(name, embeddings_dir, "embedding", allow_pickle)


def prompt_problems(prompt: str, lora_dir: str | Path | None, allow_pickle: bool = False) -> list[str]:
    """One message per ``<lora:...>`` in a prompt that does not resolve (for validation at the YAML line)."""
    problems = []
    for ref in loras_in(prompt):
        if lora_dir is None:
            problems.append(f"'{ref}' needs lora_dir: the folder where LoRA names resolve")
            continue
        try:
            find_lora(ref.name, lora_dir, allow_pickle)
        except NetworkError as error:
            problems.append(str(error))
    return problems


def embeddings_in(prompt: str, names: Iterable[str]) -> list[str]:
    """The embedding names a prompt uses, once each, in prompt order (whole words, any case)."""
    names = list(names)
    if not names:
        return []
    canonical = {name.lower(): name for name in names}
    found = [canonical[m.group(0).lower()] for m in embedding_words(names).finditer(extract_networks(prompt)[0])]
    return list(dict.fromkeys(found))


def embeddings_for(prompts: Iterable[str], embeddings_dir: str | Path, allow_pickle: bool = False) -> dict[str, Path]:
    """The embedding files some prompts use, name -> file: once per plan to load, per item for TI hashes."""
    files = network_files(embeddings_dir, allow_pickle)
    return {name: files[name][0] for prompt in prompts for name in embeddings_in(prompt, files)}


# ---------------------------------------------------------------------------------------------
# Textual-inversion embeddings


@dataclass
class Embedding:
    """One embedding file's vectors: ``{"": (n, dim)}`` for SD 1.x/2.x, ``clip_l``/``clip_g`` for SDXL."""

    name: str
    path: Path
    vectors: dict[str, Any] = field(repr=False)

    @property
    def sdxl(self) -> bool:
        return set(SDXL_PARTS) <= set(self.vectors)


def read_embedding(path: str | Path, allow_pickle: bool = False) -> Embedding:
    """An embedding in any of the formats people share: A1111 (.pt ``string_to_param``, .safetensors
    ``emb_params``), diffusers (one tensor under its token), SDXL (``clip_l`` and ``clip_g``)."""
    path = Path(path)
    data = _load_tensors(path, allow_pickle)
    if "string_to_param" in data:  # A1111's own .pt
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        vectors = {"": next(iter(params.values()))}
    elif all(part in data for part in SDXL_PARTS):
        vectors = {part: data[part] for part in SDXL_PARTS}
    else:
        tensors = {key: value for key, value in data.items() if hasattr(value, "shape")}
        if len(tensors) != 1:
            raise NetworkError(f"{path}: not an embedding (expected one tensor, or clip_l and clip_g; "
                               f"found {', '.join(sorted(tensors)) or 'none'})")
        vectors = {"": next(iter(tensors.values()))}
    return Embedding(path.stem, path, {k: v.detach().float().reshape(-1, v.shape[-1]) for k, v in vectors.items()})


def _load_tensors(path: Path, allow_pickle: bool) -> dict:
    if path.suffix.lower() in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if not allow_pickle:
        raise NetworkError(f"{path} is a pickle, which can run code when loaded; set allow_pickle: true if you trust it")
    import torch

    # torch's restricted unpickler still reads A1111's dicts of names, steps and tensors
    return torch.load(path, map_location="cpu", weights_only=True)


def add_embedding(tokenizer, text_encoder, embedding: Embedding, part: str = "") -> bool:
    """Teach one tokenizer/text-encoder pair an embedding's vectors, through diffusers' own loader.

    ``part`` picks the vector set: "" for SD 1.x, ``clip_l`` / ``clip_g`` for SDXL's two encoders.
    The token added is `embedding_token` (name), and ``name_1``... for further vectors, so prompts
    use it through `plugins.prompts` (which matches the name as a word, as A1111 does). Returns
    False, changing nothing, when the pair already knows the name.
    """
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    class Components(TextualInversionLoaderMixin):  # diffusers' loader, on components without a pipeline
        hf_device_map = None
        components: dict = {}  # no accelerate offload hooks to lift while the table grows

    if embedding_token(embedding.name) in tokenizer.get_vocab():
        return False
    if part not in embedding.vectors:
        have = "SDXL (clip_l, clip_g)" if embedding.sdxl else "SD 1.x"
        raise NetworkError(f"embedding '{embedding.name}' ({embedding.path}) is for {have}, "
                           f"not this model's {part or 'single'} text encoder")
    vectors = embedding.vectors[part]
    width = text_encoder.get_input_embeddings().weight.shape[-1]
    if vectors.shape[-1] != width:
        raise NetworkError(f"embedding '{embedding.name}' has {vectors.shape[-1]}-wide vectors; "
                           f"this text encoder takes {width} (made for another model family?)")
    Components().load_textual_inversion(vectors, token=embedding_token(embedding.name),
                                        tokenizer=tokenizer, text_encoder=text_encoder)
    return True


# ---------------------------------------------------------------------------------------------
# Civitai's hashes: "Lora hashes" and "TI hashes"


def safetensors_metadata(path: str | Path) -> dict:
    """The ``__metadata__`` strings of a .safetensors header (kohya writes its training facts there)."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(size)).get("__metadata__", {}) or {}


def _sha256(path: Path, skip_header: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if skip_header:  # kohya's/A1111's "addnet" hash: the tensor data only, not the JSON header
            handle.seek(8 + int.from_bytes(handle.read(8), "little"))
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lora_hash(path: str | Path) -> str:
    """A1111's short LoRA hash (12 hex): kohya's ``sshs_model_hash`` when the file records it, else
    sha256 of the tensor data after the header (.safetensors) or of the whole file (pickles)."""
    path = Path(path)
    safe = path.suffix.lower() in SAFE_SUFFIXES
    recorded = safetensors_metadata(path).get("sshs_model_hash") if safe else None
    return (recorded or _sha256(path, skip_header=safe))[:12]


def embedding_hash(path: str | Path) -> str:
    """A1111's short embedding hash (12 hex): sha256 of the whole file."""
    return _sha256(Path(path), skip_header=False)[:12]


def hashes_field(hashes: Mapping[str, str]) -> str:
    """``name: hash, name2: hash2`` as A1111 writes it (':' and ',' dropped from names)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {value}" for name, value in hashes.items())


def civitai_fields(loras: Mapping[str, str | Path], embeddings: Mapping[str, str | Path]) -> dict[str, str]:
    """The ``Lora hashes`` and ``TI hashes`` fields for the LoRAs (name as written -> file) and the
    embeddings an image used; absent when none. `sdbatch.metadata.format_parameters` quotes them."""
    fields = {}
    if loras:
        fields["Lora hashes"] = hashes_field({name: lora_hash(path) for name, path in loras.items()})
    if embeddings:
        fields["TI hashes"] = hashes_field({name: embedding_hash(path) for name, path in embeddings.items()})
    return fields
