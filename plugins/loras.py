"""LoRAs and textual-inversion embeddings: conditioners that change the loaded model before ``text`` encodes.

A job's ``loras:``, ``lora_dir:`` and ``<lora:name:weight>`` prompt tags become the ``lora``
conditioner, its ``embeddings:`` folder the ``embeddings`` conditioner; the job validator puts
both first, so the model they change is the one the text conditioner encodes with. The base
model loads once per worker. LoRA files are read (safetensors; pickles only with
``allow_pickle``) and added as adapters through diffusers' own LoRA loader (which converts
kohya/A1111 files), once each; a batch switches the active set and its weights and
turns adapters off entirely when its set is empty or all weights are 0, so a weight-0 row is
bit-identical to no LoRA (`switch` says why it does not call ``set_adapters``). What is active
is recorded in ``model.extra["modifiers"]``, which ``Model.cache_key`` (prompt conditioning,
directions, inversions) includes.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

from sdbatch import hookimpl
from sdbatch.api import BatchSplit, Conditioner

from .networks import (NetworkError, add_embedding, civitai_fields, embeddings_for, find_lora, hashes_field, loras_in,
                       prompt_problems, read_embedding)

NONE = "none"  # the ``lora:`` sweep value that means no LoRA from the axis


@dataclass
class LoraRef:
    """One LoRA of ``loras:``: a file or a name in ``lora_dir``, and its weight."""

    path: str | None = field(default=None, metadata={"file": True, "help": "a LoRA .safetensors file"})
    name: str | None = field(default=None, metadata={"help": "a LoRA name in lora_dir (as <lora:NAME:1> uses)"})
    weight: float = field(default=1.0, metadata={"min": -10.0, "max": 10.0})


@dataclass
class LoraOptions:
    loras: list[LoraRef] = field(default_factory=list)
    lora_dir: str | None = field(default=None, metadata={"folder": True, "help": "where LoRA names resolve"})
    set: str = field(default="", metadata={"help": "the job's `lora:` sweep axis: a name in lora_dir at weight 1, "
                                                   "or 'none'"})
    allow_pickle: bool = False


@dataclass
class EmbeddingOptions:
    folder: str = field(default="", metadata={"folder": True, "help": "textual-inversion embeddings, used by name"})
    allow_pickle: bool = False


def row_loras(item, options: LoraOptions) -> dict:
    """An item's LoRA set: file -> [text-encoder weight, U-Net weight, name as written], summed per file."""
    found: dict = {}

    def add(path, te: float, unet: float, name: str) -> None:
        key = str(Path(path).resolve())
        weights = found.setdefault(key, [0.0, 0.0, name])
        weights[0] += te
        weights[1] += unet

    for ref in options.loras:
        ref = ref if isinstance(ref, LoraRef) else LoraRef(**ref)
        path = ref.path or find_lora(ref.name, options.lora_dir, options.allow_pickle)
        add(path, ref.weight, ref.weight, ref.name or Path(path).stem)
    if options.set and options.set != NONE:
        add(find_lora(options.set, options.lora_dir, options.allow_pickle), 1.0, 1.0, options.set)
    for ref in loras_in(item.prompt):
        add(find_lora(ref.name, options.lora_dir, options.allow_pickle), ref.weight, ref.unet_weight, ref.name)
    return found


class LoraConditioner(Conditioner):
    """Applies a batch's LoRA set to the model (adapters switched, never reloaded) before text encodes."""

    name = "lora"
    description = "LoRAs from loras:, lora_dir: and <lora:name:weight> prompt tags (diffusers' LoRA loaders)"
    Options = LoraOptions
    batch_options = ("loras", "lora_dir", "set")

    def parse_options(self, options: dict) -> LoraOptions:
        loras = [LoraRef(**ref) if isinstance(ref, dict) else ref for ref in options.get("loras", [])]
        return LoraOptions(**{**options, "loras": loras})

    def condition(self, items, options, model, state) -> None:
        sets = [row_loras(item, opt) for item, opt in zip(items, options)]
        keys = [json.dumps(s, sort_keys=True) for s in sets]
        if len(set(keys)) > 1:  # prompt tags differ: each LoRA set renders on its own
            raise BatchSplit([[row for row, k in enumerate(keys) if k == key] for key in dict.fromkeys(keys)])
        activate(model, sets[0], options[0].allow_pickle)
        fields = {"Lora hashes": hashes_field({name: file_hash(path) for path, (_, _, name) in sets[0].items()})}
        fields = fields if sets[0] else {}
        for row in range(len(items)):
            state.outputs[row].setdefault("a1111", {}).update(fields)

    def check(self, options, job) -> list:
        """Every LoRA name must resolve: messages at the line that names it, with close matches."""
        problems = []
        for index, ref in enumerate(options.loras):
            if ref.path is None and ref.name is None:
                problems.append((("loras", index), "give a LoRA's path or its name (in lora_dir)"))
            elif ref.path is None:
                problems.extend((("loras", index, "name"), msg) for msg in _find_problems(ref.name, options))
        for index, name in enumerate(job.spec.sweep.get("lora") or []):
            if isinstance(name, str) and name != NONE:
                problems.extend((("sweep", "lora", index), msg) for msg in _find_problems(name, options))
        prompts = [("prompt",), job.spec.prompt] if not job.spec.sweep.get("prompt") else []
        pairs = [prompts] if prompts else [(("sweep", "prompt", i), p) for i, p in enumerate(job.spec.sweep["prompt"])]
        for where, prompt in pairs:
            if isinstance(prompt, str):
                problems.extend((where, msg) for msg in prompt_problems(prompt, options.lora_dir, options.allow_pickle))
        return problems


def _find_problems(name: str, options: LoraOptions) -> list[str]:
    if options.lora_dir is None:
        return [f"LoRA '{name}' needs lora_dir: the folder where LoRA names resolve"]
    try:
        find_lora(name, options.lora_dir, options.allow_pickle)
    except NetworkError as error:
        return [str(error)]
    return []


# ---------------------------------------------------------------- switching adapters
def activate(model, loras: dict, allow_pickle: bool = False) -> None:
    """Make ``loras`` (file -> [te weight, unet weight, name]) the model's active LoRA set."""
    active = {path: w for path, w in loras.items() if w[0] or w[1]}  # weight 0: not applied at all
    record = [{"lora": _adapter_id(path), "weights": w[:2]} for path, w in sorted(active.items())]
    modifiers = [m for m in model.extra.get("modifiers", []) if "lora" not in m]
    if [m for m in model.extra.get("modifiers", []) if "lora" in m] == record:
        return
    names = {load_adapter(model, path, allow_pickle, keep=set(active)): w for path, w in active.items()}
    switch(model, names)
    model.extra["modifiers"] = modifiers + record


def switch(model, weights: dict) -> None:
    """Activate adapters (name -> [text-encoder weight, U-Net weight]) on every LoRA layer; none: adapters off.

    diffusers' ``set_adapters`` goes through PEFT's ``set_adapter``, which toggles requires_grad
    on every adapter a layer holds, so it slows with each LoRA ever loaded (diffusers #11816).
    Rendering needs no gradients: this sets only the active list and the scales of the active
    adapters (PEFT's ``set_scale``), so a switch costs the same with 1 or 50 LoRAs loaded."""
    for component, layer in model.extra.get("lora_layers", []):
        active = [name for name in weights if name in layer.scaling]
        for name in active:
            layer.set_scale(name, weights[name][0 if component.startswith("text_encoder") else 1])
        layer._active_adapter = active
        layer._disable_adapters = not active


def _adapter_id(path: str) -> str:
    return f"{Path(path).stem}-{file_hash(path)}"


_HASHES: dict = {}


def file_hash(path) -> str:
    """A1111's LoRA hash, read once per file version (every batch records it)."""
    from .networks import lora_hash

    stat = Path(path).stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _HASHES:
        _HASHES[key] = lora_hash(path)
    return _HASHES[key]


def lora_pipeline(model):
    """A diffusers pipeline over the model's own components (same modules), for its LoRA loader mixin."""
    pipe = model.extra.get("lora_pipeline")
    if pipe is None:
        import diffusers

        cls = getattr(diffusers, model.family.pipeline)
        params = inspect.signature(cls.__init__).parameters
        scheduler = getattr(diffusers, model.scheduler_config["_class_name"]).from_config(model.scheduler_config)
        kwargs = {name: model.components.get(name) for name in params if name not in ("self", "scheduler")
                  and params[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
                  and params[name].default is inspect.Parameter.empty}
        if "requires_safety_checker" in params:
            kwargs["requires_safety_checker"] = False
        pipe = cls(scheduler=scheduler, **kwargs)
        model.extra["lora_pipeline"] = pipe
    return pipe


#: LoRAs held as adapters at once per model. PEFT walks every module of every adapter held when it
#: adds one, so loading slows with each LoRA kept (on sdbatch-tiny 0.17 s for the first, 0.8 s for the
#: 30th); past this many the least recently used one is unloaded (reloading it costs one load).
MAX_ADAPTERS = 8


def load_adapter(model, path: str, allow_pickle: bool = False, keep: set = frozenset()) -> str:
    """The adapter name of a LoRA file, loading it through diffusers' loader when it is not held.

    At most ``MAX_ADAPTERS`` are held; the least recently used one not in ``keep`` is unloaded first."""
    from collections import OrderedDict

    adapters = model.extra.setdefault("lora_adapters", OrderedDict())
    if path in adapters:
        adapters.move_to_end(path)
        return adapters[path]
    pipe = lora_pipeline(model)
    while len(adapters) >= MAX_ADAPTERS:
        unused = next((held for held in adapters if held not in keep), None)
        if unused is None:
            break  # a set larger than the limit stays whole
        pipe.delete_adapters([adapters.pop(unused)])
    count = model.extra["lora_loads"] = model.extra.get("lora_loads", 0) + 1
    name = f"lora{count - 1}"
    pipe.load_lora_weights(_read(Path(path), allow_pickle), adapter_name=name)
    if model.extra.get("batch_invariant"):  # the adapters' Linear layers, row by row as the rest
        from sdbatch.rows import make_rows_independent

        make_rows_independent(model.denoiser)
    from peft.tuners.tuners_utils import BaseTunerLayer

    model.extra["lora_layers"] = [(component, module) for component, value in model.components.items()
                                  if hasattr(value, "modules") for module in value.modules()
                                  if isinstance(module, BaseTunerLayer)]
    adapters[path] = name
    return name


def _read(path: Path, allow_pickle: bool) -> dict:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if not allow_pickle:
        raise NetworkError(f"{path} is a pickle, which can run code when loaded; set allow_pickle: true if you trust it")
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- embeddings
class EmbeddingConditioner(Conditioner):
    """Adds the textual-inversion embeddings a batch's prompts use to the model (once per worker)."""

    name = "embeddings"
    description = "textual-inversion embeddings from an embeddings: folder, used by name in prompts"
    Options = EmbeddingOptions

    def condition(self, items, options, model, state) -> None:
        opt = options[0]
        used = {}
        for row, item in enumerate(items):
            files = embeddings_for([item.prompt, item.negative_prompt], opt.folder, opt.allow_pickle)
            used.update(files)
            if files:
                state.outputs[row].setdefault("a1111", {}).update(civitai_fields({}, files))
        for name, path in used.items():
            add_to_model(model, read_embedding(path, opt.allow_pickle))


def add_to_model(model, embedding) -> None:
    """One embedding into each of the model's CLIP tokenizer/encoder pairs; recorded as a modifier."""
    from .networks import embedding_hash

    pairs = [("tokenizer", "text_encoder", "" if not embedding.sdxl else "clip_l"),
             ("tokenizer_2", "text_encoder_2", "clip_g")]
    added = False
    for tokenizer, encoder, part in pairs:
        if model.components.get(tokenizer) is not None and model.components.get(encoder) is not None:
            added |= add_embedding(model.components[tokenizer], model.components[encoder], embedding, part)
    if added:
        model.extra["modifiers"] = [*model.extra.get("modifiers", []),
                                    {"embedding": embedding.name, "hash": embedding_hash(embedding.path)}]


@hookimpl(trylast=True)
def register_conditioners(register):
    """The lora and embeddings conditioners (the validator puts them first for jobs that use them)."""
    register(LoraConditioner())
    register(EmbeddingConditioner())
