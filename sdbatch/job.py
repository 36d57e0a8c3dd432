"""The job file schema and its validation into a Job (spec + plan), collecting every problem.

A job file is YAML. Every key below is optional except where a model has no default;
see README.md ("Job file reference") for a commented example.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .api import ModelRequest, PluginUse
from .errors import JobError, KeyPath, did_you_mean, short_repr, shorten
from .inputs import (HUB_ID, IMAGE_SUFFIXES, InputFiles, folder_problem, image_files, image_option_names,
                     safetensors_problem)
from .output import check_name
from .plan import SIZE_PATTERN, Axis, Plan, SeedRange, expand_prompts, PromptError
from .plugins import Registry
from .schema import Checker, Invalid, kind_of, option_fields
from .yamlsource import Source, load_file, load_text

MAX_SEED = 2**32 - 1
MAX_ITEMS = 10**12
MAX_FRAMES = 100_000  # over an hour at 24 fps; a longer animation is more likely a typo than a plan
MAX_PROBES = 257  # per segment: t every 1/256 (finer than the pre-pass bisects, MIN_WIDTH 1/1024, rarely pays)
_FRAME = re.compile(r"[0-9]{1,12}")  # ASCII digits only: int() also reads '٣' and '０'


def _m(**meta) -> dict:
    return meta


@dataclass
class KeyframeSpec:
    """One keyframe; unset fields carry over from the keyframe before (or the job)."""

    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = field(default=None, metadata=_m(min=0, max=MAX_SEED))
    image: str | None = field(default=None, metadata=_m(file=True, format="image",
                                                         help="an image to start from (DDIM-inverted)"))
    easing: str | None = field(default=None, metadata=_m(help="easing of the segment that starts here"))
    hold: int = field(default=0, metadata=_m(min=0, max=100000, help="frames after this one that show it unchanged"))
    pin: bool = field(default=False, metadata=_m(help="with interpolate.spread: video, stay on this frame"))


@dataclass
class InterpolateSpec:
    embeddings: Literal["slerp", "lerp", "attention"] = field(default="slerp", metadata=_m(
        help="slerp or lerp the text embeddings, or attention: mix cross-attention to both prompts (AID, U-Nets)"))
    noise: Literal["slerp", "lerp"] = "slerp"
    easing: str = field(default="linear", metadata=_m(help="linear, ease-in, ease-out, ease-in-out, cosine, cubic-bezier(x1, y1, x2, y2)"))
    timing: Literal["even", "uniform"] = field(default="even", metadata=_m(
        help="even: frames change the picture equally (measured at the start of run); uniform: even steps in t"))
    spread: Literal["segment", "video"] = field(default="segment", metadata=_m(
        help="even timing per segment, or across the video: keyframes other than the first, last and pinned "
             "move so every segment's frames change the picture about equally"))
    probes: int | None = field(default=None, metadata=_m(min=3, max=MAX_PROBES, help=(
        "even timing's probes per segment (default: about a quarter of its frames, at least 3, so the "
        "pre-pass costs under 30% of the render); more measure the change finer, and cost as much as frames")))


@dataclass
class AnimationSpec:
    """Keyframed interpolation: frame -> keyframe; every frame becomes one item."""

    keyframes: dict[str, KeyframeSpec] = field(metadata=_m(help="frame number -> {prompt, seed, image, ...}"))
    fps: float = field(default=12.0, metadata=_m(min=0.1, max=240.0))
    interpolate: InterpolateSpec = field(default_factory=InterpolateSpec)
    schedules: dict[str, Any] = field(default_factory=dict)
    loop: bool = field(default=False, metadata=_m(help="interpolate back to the first keyframe so the video loops"))


@dataclass
class EditSourceSpec:
    """A generated source (prompt + seed, its trajectory replayed) or a real image (DDIM-inverted)."""

    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = field(default=None, metadata=_m(min=0, max=MAX_SEED))
    image: str | None = field(default=None, metadata=_m(file=True, format="image"))


@dataclass
class EditSpec:
    """Edit sources along directions found in the model, with a sweep of strengths."""

    directions: list[dict[str, Any]] = field(metadata=_m(min_items=1, help="each {kind: NAME, ...its options}"))
    source: EditSourceSpec | None = None
    sources: list[EditSourceSpec] = field(default_factory=list)
    strengths: Any = field(default_factory=lambda: [-2.0, -1.0, 0.0, 1.0, 2.0],
                           metadata=_m(help="a list, or {from: -2, to: 2, steps: 9}"))


@dataclass
class MemorySpec:
    """Memory savers for small GPUs, applied when the model loads."""

    vae_tiling: bool = field(default=False, metadata=_m(help="decode large images in tiles (changes pixels slightly)"))
    vae_slicing: bool = field(default=False, metadata=_m(help="decode a batch one image at a time"))
    offload: Literal["none", "model", "sequential"] = field(default="none", metadata=_m(
        help="CUDA: keep components on the CPU until used (model), or layer by layer (sequential, slowest)"))
    t5: Literal["on", "off"] = field(default="on", metadata=_m(help="SD3: off drops the T5 encoder (less memory, "
                                                                    "weaker prompt following)"))


@dataclass
class SpeedSpec:
    """GPU throughput options, applied when the model loads (each is part of the item id when set)."""

    compile: Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = field(
        default="off", metadata=_m(help="torch.compile the denoiser with this mode (the first batch compiles)"))
    compile_backend: Literal["inductor", "aot_eager", "eager"] = field(
        default="inductor", metadata=_m(help="torch.compile backend (inductor on GPUs; aot_eager checks without one)"))
    channels_last: bool = field(default=False, metadata=_m(help="U-Net, ControlNets and VAE in channels-last memory "
                                                                "format (faster convolutions on CUDA)"))
    tiny_vae: str | None = field(default=None, metadata=_m(
        model_ref=True, help="decode with this AutoencoderTiny (TAESD: madebyollin/taesd, taesdxl, taesd3, taef1; "
                             "a folder or hub id): much faster, lower fidelity"))
    decode_batch: int = field(default=0, metadata=_m(min=0, max=256, help="CUDA: rows per VAE decode call "
                                                                          "(0: as many as fit in a quarter of "
                                                                          "the GPU's memory)"))


@dataclass
class LoraSpec:
    """One entry of ``loras:`` (the lora plugin reads it)."""

    path: str | None = field(default=None, metadata=_m(file=True, help="a LoRA .safetensors file"))
    name: str | None = field(default=None, metadata=_m(help="a LoRA name in lora_dir"))
    weight: float = field(default=1.0, metadata=_m(min=-10.0, max=10.0))


@dataclass
class JobSpec:
    """The top level of a job file."""

    name: str | None = None
    model: str = field(default="sdbatch-tiny", metadata=_m(help="a registered name, a diffusers folder, a .safetensors file or a hub id"))
    allow_pickle: bool = field(default=False, metadata=_m(help="allow .ckpt/.bin pickle checkpoints, which can run code"))
    model_config: str | None = field(default=None, metadata=_m(help="diffusers folder or hub id with configs for a single-file model"))
    model_family: str | None = field(default=None, metadata=_m(help="sd1, sdxl, sd3 or flux (or a plugin's): "
                                                                    "overrides detection from the model's files"))
    memory: MemorySpec = field(default_factory=MemorySpec)
    speed: SpeedSpec = field(default_factory=SpeedSpec)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    batch_size: int = field(default=1, metadata=_m(min=1, max=1024))
    retries: int = field(default=1, metadata=_m(min=0, max=10, help="times a failing item is tried again"))
    threads: int | None = field(default=None, metadata=_m(
        min=1, max=1024, help="CPU threads per renderer; CPU pixels depend on it, so every worker uses the same"))
    batch_invariant: bool = field(default=True, metadata=_m(
        help="CPU: kernels that give an item the same pixels in any batch (about 1% slower); false: "
             "PyTorch's default ones, whose pixels can change by a level with batch size and on resume"))
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = field(default=0, metadata=_m(min=0, max=MAX_SEED))
    steps: int | None = field(default=None, metadata=_m(min=1, max=1000))
    guidance: float | None = field(default=None, metadata=_m(min=0.0, max=100.0))
    sampler: str | None = None
    width: int | None = field(default=None, metadata=_m(min=8, max=8192, multiple_of=8))
    height: int | None = field(default=None, metadata=_m(min=8, max=8192, multiple_of=8))
    wildcards: str | None = field(default=None, metadata=_m(folder=True))
    prompt_sampling: Literal["all", "random"] = field(
        default="all", metadata=_m(help="all: every template variant is an item; random: one per item, from its seed"))
    sweep: dict[str, Any] = field(default_factory=dict)
    zip: list[list[str]] = field(default_factory=list)
    animation: AnimationSpec | None = None
    edit: EditSpec | None = None
    conditioners: Any = field(default_factory=lambda: ["text"])
    postprocess: Any = field(default_factory=list)
    outputs: Any = field(default_factory=lambda: ["png"])
    # LoRAs and embeddings (issue 15): they become the lora / embeddings conditioners, run first
    lora_dir: str | None = field(default=None, metadata=_m(folder=True, help="where <lora:NAME:w> names resolve"))
    loras: list[LoraSpec] = field(default_factory=list)
    # the hires fix (issue 15): the hires conditioner, run last
    hires: dict | None = field(default=None, metadata=_m(
        help="a second pass at a larger size: {scale, width, height, steps, denoise, upscaler}"))
    embeddings: str | None = field(default=None, metadata=_m(folder=True, help="textual-inversion embeddings, used by name"))


#: Item fields a sweep can vary directly: name -> (type, metadata)
FIELD_AXES: dict[str, tuple[Any, dict]] = {
    "prompt": (str, {}),
    "negative_prompt": (str, {}),
    "seed": (int, {"min": 0, "max": MAX_SEED}),
    "steps": (int, {"min": 1, "max": 1000}),
    "guidance": (float, {"min": 0.0, "max": 100.0}),
    "sampler": (str, {}),
    "width": (int, {"min": 8, "max": 8192, "multiple_of": 8}),
    "height": (int, {"min": 8, "max": 8192, "multiple_of": 8}),
    "size": (str, {"help": "WIDTHxHEIGHT, e.g. 512x768"}),
    "model": (str, {}),
}

#: sweep axes of the LoRA job keys (besides ``loras[N].weight``)
NETWORK_AXES = ("lora",)

#: plugin-use list key in the job -> registry kind
USE_KINDS = {"conditioners": "conditioner", "postprocess": "postprocessor", "outputs": "writer"}


@dataclass
class Job:
    """A validated job: its spec, plugin uses, outputs and lazy plan."""

    spec: JobSpec
    source: Source
    plan: Plan
    uses: dict  # job key -> list[PluginUse] (names resolved, options as plain data)
    writers: list  # (Writer class, Options instance, PluginUse)
    plugins: dict = field(default_factory=dict)  # kind -> name -> the conditioner/postprocessor objects used

    @property
    def filename(self) -> str:
        return self.source.filename


def load_job(path, registry: Registry) -> Job:
    """Read, validate and plan a job file; raise JobError listing every problem."""
    return validate_source(load_file(path), registry)


def load_job_text(text: str, registry: Registry, filename: str = "<job>") -> Job:
    return validate_source(load_text(text, filename), registry)


def validate_source(source: Source, registry: Registry) -> Job:
    checker = Checker(source)
    try:
        spec = checker.dataclass(source.data, JobSpec, ())
    except Invalid:
        spec = None
    if spec is None:
        # Keep going with what parsed, so one run reports as much as possible.
        spec = _partial_spec(source)
    validator = _Validator(source, checker, registry, spec)
    job = validator.run()
    if checker.problems:
        raise JobError(source.filename, checker.problems)
    return job


def _partial_spec(source: Source) -> JobSpec:
    """A spec from the keys that did validate (the rest take defaults); their problems are already recorded."""
    data = source.data if isinstance(source.data, dict) else {}
    spec = JobSpec()
    scratch = Checker(source)
    for name, (tp, meta) in option_fields(JobSpec).items():
        if name in data:
            try:
                setattr(spec, name, scratch.convert(data[name], tp, (name,), meta))
            except Invalid:
                pass
    return spec


class _Validator:
    """Checks everything beyond types: plugin names and options, sweeps, models."""

    def __init__(self, source: Source, checker: Checker, registry: Registry, spec: JobSpec):
        self.source, self.checker, self.registry, self.spec = source, checker, registry, spec

    def fail(self, path: KeyPath, message: str) -> None:
        self.checker.fail(path, message)

    def _plugin_objects(self, uses: dict) -> dict:
        """The conditioner and post-processor objects a job uses, for writers (A1111 fields)."""
        found = {}
        for key, kind in (("conditioners", "conditioner"), ("postprocess", "postprocessor")):
            entries = {use.name: self.registry.get(kind, use.name) for use in uses[key]}
            found[kind] = {name: entry.obj for name, entry in entries.items() if entry is not None}
        return found

    def _family_objects(self, models: dict) -> dict:
        """Model reference -> its Family object, for writers (A1111 fields that depend on the family)."""
        return {ref: self.registry.get("family", info.family).obj for ref, info in models.items()
                if info.family and self.registry.get("family", info.family) is not None}

    def run(self) -> Job:
        spec = self.spec
        self.positions: dict[str, list[int]] = {}  # job key -> list index of each valid use
        uses = {key: self._uses(key) for key in USE_KINDS}
        for section, conditioner in (("animation", "keyframes"), ("edit", "edit")):
            if getattr(spec, section) is None or any(u.name == conditioner for u in uses["conditioners"]):
                continue
            if self.registry.get("conditioner", conditioner) is None:
                self.fail((section,), self.registry.unknown_message("conditioner", conditioner))
            else:
                uses["conditioners"].append(PluginUse(conditioner, {}))  # runs after the text conditioner
                self.positions.setdefault("conditioners", []).append((section,))  # its problems: at the section
        wildcards_problem = folder_problem(Path(spec.wildcards)) if spec.wildcards else None
        if wildcards_problem:  # dynamicprompts would read a FIFO there forever
            self.fail(("wildcards",), wildcards_problem)
            spec.wildcards = None
        name_problem = check_name(spec.name) if spec.name is not None else None
        if name_problem:
            self.fail(("name",), name_problem)
        if spec.animation is not None and spec.edit is not None:
            self.fail(("edit",), "a job is either an animation or an edit, not both")
        self._network_uses(spec, uses)
        self._hires_use(spec, uses)
        self._speed(spec.speed)
        writers = self._writers(uses["outputs"])
        self._sampler(spec.sampler, ("sampler",))
        if spec.model_family is not None and self.registry.get("family", spec.model_family) is None:
            self.fail(("model_family",), self.registry.unknown_message("family", spec.model_family))
            spec.model_family = None
        models = self._models(spec)
        if spec.edit is not None and spec.sampler is None and all(
                getattr(self.registry.get("family", info.family).obj, "sampler_kind", "eps") == "eps"
                for info in models.values() if info.family):
            spec.sampler = "DDIM"  # edits replay deterministic trajectories (flow samplers already are)
        self._family_checks(models, uses, spec)
        axes = self._axes(spec, uses, models)
        timeline = self._animation(spec, uses, models) if spec.animation is not None else None
        edit = self._edit(spec) if spec.edit is not None else None
        inputs = self._input_files(uses, timeline)
        plan = Plan(
            base=spec, axes=axes, models=models, conditioners=tuple(uses["conditioners"]),
            postprocess=tuple(uses["postprocess"]), timeline=timeline, edit=edit, inputs=inputs,
            batch_options=self._batch_options(uses),
            option_axes={name: axis[2] for name, axis in self._network_axes(spec, uses).items()},
        )
        if plan.size > MAX_ITEMS:  # len() would overflow past 2**63; no run gets near this anyway
            self.fail(("sweep",) if spec.sweep else (),
                      f"the plan has {plan.size:.3g} items; the limit is {MAX_ITEMS:,}")
        job = Job(spec, self.source, plan, uses, [(cls, options, use) for cls, options, use, _ in writers],
                  {**self._plugin_objects(uses), "family": self._family_objects(models)})
        for writer_class, options, use, index in writers:
            self._plugin_check(("outputs", index, use.name), lambda: writer_class.check(options, job))
        for index, use in zip(self.positions["conditioners"], uses["conditioners"]):
            conditioner = self.registry.get("conditioner", use.name).obj
            where = index if isinstance(index, tuple) else ("conditioners", index, use.name)
            self._plugin_check(where, lambda: conditioner.check(conditioner.parse_options(use.options), job))
        return job

    def _plugin_check(self, path: KeyPath, check) -> None:
        """A plugin's problems with its use; a file it cannot read (a path it stats) is one too.

        A problem may be ``(key path, message)``: at another line of the job (a LoRA named in a prompt)."""
        try:
            messages = check()
        except OSError as exc:
            messages = [f"cannot read {shorten(str(exc.filename or ''))}: {exc.strerror or exc}"]
        for message in messages:
            if isinstance(message, tuple):
                self.fail(*message)
            else:
                self.fail(path, message)

    # -- LoRAs and embeddings (issue 15) ------------------------------------------------
    def _network_uses(self, spec: JobSpec, uses: dict) -> None:
        """Job keys for LoRAs and embeddings as conditioner uses put first (they change the model text encodes
        with); their position is the job key, for messages."""
        prompts = [spec.prompt, *(p for p in spec.sweep.get("prompt") or [] if isinstance(p, str))]
        found = []
        if (spec.loras or spec.lora_dir or any(k in NETWORK_AXES or k.startswith("loras[") for k in spec.sweep)
                or any("<lora:" in p for p in prompts)):
            found.append((("loras",) if spec.loras else ("lora_dir",), PluginUse("lora", {
                "loras": [dataclasses.asdict(ref) for ref in spec.loras], "lora_dir": spec.lora_dir, "set": "",
                "allow_pickle": spec.allow_pickle})))
        if spec.embeddings:
            found.append((("embeddings",), PluginUse("embeddings", {"folder": spec.embeddings,
                                                                     "allow_pickle": spec.allow_pickle})))
        positions = self.positions.setdefault("conditioners", [])
        for path, use in reversed(found):
            if self.registry.get("conditioner", use.name) is None:
                self.fail(path, self.registry.unknown_message("conditioner", use.name))
                continue
            uses["conditioners"].insert(0, use)
            positions.insert(0, path)

    def _speed(self, speed: SpeedSpec) -> None:
        """A tiny VAE that is not there stops at its line (a hub id is checked as it loads)."""
        ref = speed.tiny_vae
        if not ref:
            return
        path = Path(ref).expanduser()
        local = path.is_absolute() or ref.startswith(".") or not HUB_ID.fullmatch(ref) or path.exists()
        if local and not (path / "config.json").is_file():
            self.fail(("speed", "tiny_vae"), f"no AutoencoderTiny at {shorten(ref)} (a folder with config.json "
                                             f"and safetensors weights, or a hub id such as madebyollin/taesd)")

    def _hires_use(self, spec: JobSpec, uses: dict) -> None:
        """``hires:`` as the hires conditioner's use, after every other conditioner (its options checked there)."""
        if spec.hires is None:
            return
        entry = self.registry.get("conditioner", "hires")
        if entry is None:
            self.fail(("hires",), self.registry.unknown_message("conditioner", "hires"))
            return
        if any(use.name == "hires" for use in uses["conditioners"]):
            self.fail(("hires",), "the hires fix is given twice (hires: and under conditioners)")
            return
        try:
            parsed = self.checker.convert(spec.hires, entry.obj.Options, ("hires",))
        except Invalid:
            return
        uses["conditioners"].append(PluginUse(entry.name, _as_plain(parsed, spec.hires)))
        self.positions.setdefault("conditioners", []).append(("hires",))

    def _network_axes(self, spec: JobSpec, uses: dict) -> dict:
        """``lora: [none, a, b]`` and ``loras[N].weight`` sweep axes: name -> (type, meta, option path)."""
        if not any(use.name == "lora" for use in uses["conditioners"]):
            return {}
        axes = {"lora": (str, {}, ("lora", "set"))}
        for index in range(len(spec.loras)):
            axes[f"loras[{index}].weight"] = (float, {"min": -10.0, "max": 10.0}, ("lora", "loras", index, "weight"))
        return axes

    # -- input images ------------------------------------------------------------------
    def _input_files(self, uses: dict, timeline) -> InputFiles:
        """Which conditioner options name images; in an animation, check per-frame folders are long enough."""
        fields = {use.name: image_option_names(self.registry.get("conditioner", use.name).obj.Options)
                  for use in uses["conditioners"]}
        if timeline is not None:
            for index, use in zip(self.positions["conditioners"], uses["conditioners"]):
                for name in fields[use.name]:
                    value = use.options.get(name)
                    if value and Path(value).is_dir() and len(image_files(value)) < timeline.frames:
                        self.fail(("conditioners", index, use.name, name),
                                  f"{value} has {len(image_files(value))} images; the animation's "
                                  f"{timeline.frames} frames need one each (frame n takes the n-th by name)")
        return InputFiles(fields)

    def _folder_axes(self, uses: dict, swept: dict, animation: bool) -> dict:
        """Folders given as conditioner images become axes: one item per image, sorted by name."""
        if animation:  # an animation takes a folder as one image per frame instead
            return {}
        axes = {}
        for index, use in zip(self.positions["conditioners"], uses["conditioners"]):
            for name in image_option_names(self.registry.get("conditioner", use.name).obj.Options):
                value, key = use.options.get(name), f"{use.name}.{name}"
                if not value or key in swept or not Path(value).is_dir():
                    continue
                files = image_files(value)
                if not files:
                    self.fail(("conditioners", index, use.name, name),
                              f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {value}")
                    continue
                axes[key] = files
        return axes

    def _batch_options(self, uses: dict) -> dict:
        """Conditioner name -> options that must match within a batch."""
        found = {}
        for use in uses["conditioners"]:
            names = self.registry.get("conditioner", use.name).obj.batch_options
            if names:
                found[use.name] = tuple(names)
        return found

    # -- plugin uses -------------------------------------------------------------
    def _uses(self, key: str) -> list[PluginUse]:
        value = getattr(self.spec, key)
        kind = USE_KINDS[key]
        result, self.positions[key] = [], []
        if not isinstance(value, list):
            self.fail((key,), f"expected a list of {kind}s (a name, or a mapping of name to options), "
                              f"got {kind_of(value)}")
            return []
        for index, raw in enumerate(value):
            path = (key, index)
            if isinstance(raw, str):
                name, options = raw, {}
            elif isinstance(raw, dict) and len(raw) == 1:
                name, options = next(iter(raw.items()))
                path = path + (name,)
                options = {} if options is None else options
            else:
                self.fail(path, f"expected a {kind} name or a one-key mapping {{name: {{options}}}}, "
                                f"got {short_repr(raw)}")
                continue
            entry = self.registry.get(kind, str(name))
            if entry is None:
                self.fail(path, self.registry.unknown_message(kind, str(name)))
                continue
            plugin = entry.obj
            try:
                parsed = self.checker.convert(options, plugin.Options, path)
            except Invalid:
                continue
            result.append(PluginUse(entry.name, _as_plain(parsed, options)))
            self.positions[key].append(index)
        return result

    def _writers(self, outputs: list[PluginUse]) -> list:
        writers = []
        for index, use in zip(self.positions["outputs"], outputs):
            cls = self.registry.get("writer", use.name).obj
            writers.append((cls, cls.Options(**use.options), use, index))
        return writers

    def _sampler(self, name: str | None, path: KeyPath) -> None:
        if name is not None and self.registry.get("sampler", name) is None:
            self.fail(path, self.registry.unknown_message("sampler", name))

    # -- models ---------------------------------------------------------------------
    def _models(self, spec: JobSpec) -> dict:
        sweep_models = spec.sweep.get("model") if isinstance(spec.sweep, dict) else None
        refs = []
        if not isinstance(sweep_models, list):  # a model sweep replaces the job's model
            refs.append((spec.model, ("model",)))
        else:
            refs += [(ref, ("sweep", "model", i)) for i, ref in enumerate(sweep_models) if isinstance(ref, str)]
        infos = {}
        for ref, path in refs:
            if ref not in infos:
                info = self.describe_model(ref, path)
                if info is not None:
                    infos[ref] = info
        return infos

    def describe_model(self, ref: str, path: KeyPath):
        from .schema import resolve_path, too_long_for_a_path

        candidate = resolve_path(ref, self.source.folder)
        if candidate is None or too_long_for_a_path(ref):
            self.fail(path, f"model '{shorten(ref)}' is not a name, a hub id or a path")
            return None
        problem = safetensors_problem(candidate)
        if problem:
            self.fail(path, problem)
            return None
        request = ModelRequest(ref, str(self.source.folder), self.spec.allow_pickle, self.spec.model_config,
                               self.spec.model_family)
        for entry in self.registry.entries["model_loader"].values():
            try:
                info = entry.obj.describe(request)
                if info is not None:
                    info.loader = entry.name
                    self._family(info, request, path)
            except ValueError as exc:
                self.fail(path, str(exc))
                return None
            except OSError as exc:  # a name too long for a path, a folder it may not read
                self.fail(path, f"cannot use model '{shorten(ref)}': {exc.strerror or exc}")
                return None
            if info is not None:
                if info.defaults.get("sampler") and self.registry.get("sampler", info.defaults["sampler"]) is None:
                    info.defaults.pop("sampler")
                return info
        loaders = ", ".join(self.registry.names("model_loader")) or "none installed"
        self.fail(path, f"model '{shorten(ref)}' not found: not a registered name, a diffusers folder, a "
                        f".safetensors file or a hub id (loaders: {loaders})")
        return None

    def _family(self, info, request: ModelRequest, path: KeyPath) -> None:
        """Which family runs the model (declared or detected from its files), and its defaults."""
        from dataclasses import asdict

        from .models import detect_family

        name = request.family or info.family or detect_family(self.registry, info)
        if name is None and info.kind == "single-file" and not info.location.endswith(".safetensors"):
            name = "sd1"  # a pickle's keys cannot be read without running it; SD 1.x is what most are
        if name is None:
            known = ", ".join(self.registry.names("family")) or "none installed"
            raise ValueError(f"cannot tell which model family '{info.ref}' is (families: {known}); "
                             f"set model_family: to one of them")
        entry = self.registry.get("family", name)
        if entry is None:
            raise ValueError(self.registry.unknown_message("family", name))
        info.family = entry.name
        info.memory = {**asdict(self.spec.memory), **asdict(self.spec.speed)}  # how it loads and runs
        info.defaults = {**entry.obj.defaults, **info.defaults}

    def _family_checks(self, models: dict, uses: dict, spec: JobSpec) -> None:
        """Capabilities and samplers that do not apply to a model's family stop at their YAML line."""
        families = {info.family: self.registry.get("family", info.family).obj
                    for info in models.values() if info.family and self.registry.get("family", info.family)}
        for index, use in zip(self.positions["conditioners"], uses["conditioners"]):
            conditioner = self.registry.get("conditioner", use.name).obj
            try:
                required = conditioner.requirements(conditioner.parse_options(use.options))
            except (TypeError, ValueError):  # options already reported; fall back to the static list
                required = getattr(conditioner, "requires", ())
            for family in families.values():
                for capability in required:
                    if capability not in family.capabilities:
                        self.fail(index if isinstance(index, tuple) else ("conditioners", index, use.name),
                                  family.why_not(capability))
        directions = spec.edit.directions if spec.edit is not None and isinstance(spec.edit.directions, list) else []
        for index, raw in enumerate(directions):
            kind = raw.get("kind") if isinstance(raw, dict) else None
            finder = self.registry.get("direction", kind) if isinstance(kind, str) else None
            for family in families.values() if finder is not None else ():
                for capability in getattr(finder.obj, "requires", ()):
                    if capability not in family.capabilities:
                        self.fail(("edit", "directions", index, "kind"), family.why_not(capability))
        if spec.negative_prompt:
            for family in families.values():
                if "negative_prompt" not in family.capabilities:
                    self.fail(("negative_prompt",), family.why_not("negative_prompt"))
        samplers = [(spec.sampler, ("sampler",))] if spec.sampler else []
        sweep = spec.sweep.get("sampler") if isinstance(spec.sweep, dict) else None
        if isinstance(sweep, list):
            samplers += [(name, ("sweep", "sampler", i)) for i, name in enumerate(sweep) if isinstance(name, str)]
        for name, path in samplers:
            entry = self.registry.get("sampler", name)
            for family in families.values() if entry is not None else ():
                kind = getattr(entry.obj, "kind", "eps")
                if kind != family.sampler_kind:
                    fitting = [e.name for e in self.registry.entries["sampler"].values()
                               if getattr(e.obj, "kind", "eps") == family.sampler_kind]
                    self.fail(path, f"sampler '{entry.name}' does not fit {family.description} "
                                    f"({family.sampler_kind} model); these do: {', '.join(fitting[:12])}")

    # -- animation -----------------------------------------------------------------------
    #: Item fields a keyframe sets: they cannot also be swept.
    KEYFRAME_FIELDS = ("prompt", "negative_prompt", "seed")

    def _animation(self, spec: JobSpec, uses: dict, models: dict):
        """The Timeline of an animation job, with frames as the plan's last axis."""
        from .animation import Keyframe, Timeline
        from .inputs import file_sha256
        from .latents import easing
        from .schedules import Schedule, ScheduleError

        anim, base = spec.animation, ("animation",)
        for name in self.KEYFRAME_FIELDS:
            if name in spec.sweep:
                self.fail(("sweep", name), f"'{name}' comes from the animation's keyframes; it cannot also be swept")
        frames = {}
        for key, value in anim.keyframes.items():
            path = base + ("keyframes", _yaml_key(key))
            if not _FRAME.fullmatch(str(key)):
                self.fail(path, f"keyframe keys are frame numbers (0, 24, ...), got {short_repr(key)}")
            elif int(key) >= MAX_FRAMES:
                self.fail(path, f"frame {shorten(key)} is past the limit of {MAX_FRAMES:,} frames")
            else:
                frames[int(key)] = (value, path)
        if frames and 0 not in frames:
            self.fail(base + ("keyframes",), "the first keyframe must be at frame 0")
        if not frames:
            self.fail(base + ("keyframes",), "an animation needs at least one keyframe")
            return None
        for name, path in [(anim.interpolate.easing, base + ("interpolate", "easing"))] + [
            (kf.easing, p + ("easing",)) for kf, p in frames.values() if kf.easing
        ]:
            try:
                easing(name)
            except ValueError as exc:
                self.fail(path, str(exc))
        keyframes, prompt, negative, seed = [], spec.prompt, spec.negative_prompt, spec.seed
        for frame in sorted(frames):
            kf, _ = frames[frame]
            prompt = kf.prompt if kf.prompt is not None else prompt
            negative = kf.negative_prompt if kf.negative_prompt is not None else negative
            seed = kf.seed if kf.seed is not None else seed
            sha = file_sha256(kf.image) if kf.image else None
            keyframes.append(Keyframe(frame, prompt, negative, seed, kf.image, sha, kf.easing, kf.hold, kf.pin))
            if kf.pin and anim.interpolate.spread != "video":
                self.fail(frames[frame][1] + ("pin",), "pin only matters with interpolate.spread: video")
        for a, b in zip(keyframes, keyframes[1:]):
            if a.frame + a.hold >= b.frame:
                self.fail(frames[a.frame][1] + ("hold",), f"holds to frame {a.frame + a.hold}, but the next "
                                                          f"keyframe is at frame {b.frame}")
        if anim.interpolate.embeddings == "attention":
            for info in models.values():
                entry = self.registry.get("family", info.family) if info.family else None
                if entry is not None and "attention" not in entry.obj.capabilities:
                    self.fail(base + ("interpolate", "embeddings"),
                              f"{entry.obj.why_not('attention')} (model '{info.ref}'): use slerp or lerp")
        if anim.interpolate.spread == "video" and anim.interpolate.timing != "even":
            self.fail(base + ("interpolate", "spread"), "spread: video moves keyframes by the change even timing "
                                                        "measures: it needs timing: even")
        if anim.interpolate.probes is not None and anim.interpolate.timing != "even":
            self.fail(base + ("interpolate", "probes"), "probes measure the change for even timing: it needs "
                                                        "timing: even")
        if anim.loop and len(keyframes) < 2:
            self.fail(base + ("loop",), "a loop needs at least two keyframes to move between")
        timeline = Timeline(keyframes, anim.fps, anim.interpolate.embeddings, anim.interpolate.noise,
                            anim.interpolate.easing, timing=anim.interpolate.timing, loop=anim.loop,
                            spread=anim.interpolate.spread, probes=anim.interpolate.probes)
        count = timeline.frames
        targets = self._axis_targets(uses)
        schedules = {}
        for name, text in anim.schedules.items():
            path = base + ("schedules", name)
            numeric = _numeric_type(targets[name][0]) if name in targets else None
            if numeric is None:
                numeric_names = [n for n, (tp, _) in targets.items() if _numeric_type(tp)]
                self.fail(path, f"'{name}' is not a numeric parameter{did_you_mean(name, numeric_names)}; "
                                f"schedulable: {', '.join(numeric_names)}")
                continue
            if name in spec.sweep:
                self.fail(path, f"'{name}' is both swept and scheduled; choose one")
                continue
            try:
                values = Schedule.parse(text).values(count, seed=keyframes[0].seed)
            except ScheduleError as exc:
                self.fail(path, str(exc))
                continue
            meta = targets[name][1]
            if numeric is int:
                values = [int(round(v)) for v in values]
            for frame, value in enumerate(values):
                if ("min" in meta and value < meta["min"]) or ("max" in meta and value > meta["max"]):
                    self.fail(path, f"gives {value:g} at frame {frame}, outside {meta.get('min')}..{meta.get('max')}")
                    break
            schedules[name] = values
        timeline.schedules = schedules
        return timeline

    # -- editing -------------------------------------------------------------------------
    def _edit(self, spec: JobSpec):
        """The EditPlan: labelled sources and directions, and the strengths, as plan axes."""
        from .inputs import file_sha256
        from .editing import EditPlan

        edit, base = spec.edit, ("edit",)
        for name in self.KEYFRAME_FIELDS:
            if name in spec.sweep:
                self.fail(("sweep", name), f"'{name}' comes from the edit's sources; it cannot also be swept")
        sources = ([edit.source] if edit.source else []) + list(edit.sources)
        if not sources:
            self.fail(base, "an edit needs a source: {prompt, seed} or {image, prompt}")
        plan = EditPlan()
        for number, source in enumerate(sources):
            prompt = source.prompt if source.prompt is not None else spec.prompt
            seed = source.seed if source.seed is not None else spec.seed
            entry = {"prompt": prompt, "seed": seed,
                     "negative_prompt": source.negative_prompt if source.negative_prompt is not None
                     else spec.negative_prompt}
            if source.image:
                entry.update(image=source.image, image_sha256=file_sha256(source.image))
                label = f"{number}: {Path(source.image).name}"
            else:
                label = f"{number}: {textwrap.shorten(prompt, 40, placeholder=' …')} (seed {seed})"
            plan.sources[label] = entry
        for index, raw in enumerate(edit.directions):
            self._direction(plan, dict(raw), base + ("directions", index))
        try:
            plan.strengths = self._strengths(edit.strengths, base + ("strengths",))
        except Invalid:
            pass
        return plan

    def _direction(self, plan, raw: dict, path: KeyPath) -> None:
        kind = raw.pop("kind", None)
        if kind is None:
            self.fail(path, "missing required key 'kind' (a direction finder: "
                            f"{', '.join(self.registry.names('direction'))})")
            return
        entry = self.registry.get("direction", str(kind))
        if entry is None:
            self.fail(path + ("kind",), self.registry.unknown_message("direction", str(kind)))
            return
        finder = entry.obj
        if "from" in raw:  # a Python keyword: option dataclasses spell it from_
            raw["from_"] = raw.pop("from")
        try:
            options = self.checker.convert(raw, finder.Options, path)
        except Invalid:
            return
        for index, label in enumerate(finder.labels(options)):
            full = f"{len(plan.directions)}: {label}"
            plan.directions[full] = {"kind": entry.name, "options": _as_plain(options, raw), "index": index}

    def _strengths(self, raw, path: KeyPath) -> list[float]:
        from .editing import strength_values

        @dataclass
        class StrengthRange:
            steps: int = field(metadata=_m(min=1, max=1000))
            to: float = 2.0
            start: float = field(default=-2.0)

        if isinstance(raw, dict):
            data = dict(raw)
            if "from" in data:
                data["start"] = data.pop("from")
            spec = self.checker.dataclass(data, StrengthRange, path)
            return strength_values({"from": spec.start, "to": spec.to, "steps": spec.steps})
        values = self.checker.convert(raw, list[float], path)
        if not values:
            raise self.checker.fail(path, "expected at least one strength")
        return strength_values(values)

    # -- sweeps -------------------------------------------------------------------------
    def _axes(self, spec: JobSpec, uses: dict, models: dict) -> list[Axis]:
        targets = self._axis_targets(uses)
        values: dict[str, list] = {}
        for key, raw in spec.sweep.items():
            path = ("sweep", key)
            if key not in targets:
                self.fail(path, f"unknown sweep axis '{key}'{did_you_mean(key, targets)}; "
                                f"axes: {', '.join(targets)}")
                continue
            converted = self._axis_values(key, raw, targets[key], path)
            if converted is not None:
                values[key] = converted
        prompt_values = values.get("prompt", [spec.prompt])
        prompt_path = ("sweep", "prompt") if "prompt" in values else ("prompt",)
        try:
            if spec.prompt_sampling == "random":  # one variant per item, drawn in the plan from its seed
                from .plan import PromptSampler

                sampler = PromptSampler(spec.wildcards)
                for template in prompt_values:
                    sampler.sample(template, 0)  # parses now: a bad template fails validation, not the run
                expanded = [(t, t) for t in prompt_values]
            else:
                expanded = expand_prompts(prompt_values, spec.wildcards)
        except PromptError as exc:
            self.fail(prompt_path + ((exc.index,) if "prompt" in values else ()), str(exc))
            expanded = [(p, p) for p in prompt_values]
        if len(expanded) > 1 or "prompt" in values:
            values["prompt"] = expanded
            if "prompt" not in spec.sweep:
                values = {"prompt": expanded, **values}  # a template's variants form the outer axis
        values.update(self._folder_axes(uses, values, spec.animation is not None))
        return self._group(values, spec)

    def _axis_targets(self, uses: dict) -> dict:
        targets = dict(FIELD_AXES)
        targets.update({name: (tp, meta) for name, (tp, meta, _) in self._network_axes(self.spec, uses).items()})
        for key in ("conditioners", "postprocess"):
            for use in uses[key]:
                plugin = self.registry.get(USE_KINDS[key], use.name).obj
                for option, (tp, meta) in option_fields(plugin.Options).items():
                    targets.setdefault(f"{use.name}.{option}", (tp, meta))
        return targets

    def _axis_values(self, key: str, raw: Any, target: tuple, path: KeyPath) -> list | SeedRange | None:
        tp, meta = target
        if key == "seed" and isinstance(raw, dict):
            return self._seed_range(raw, path)
        if not isinstance(raw, list) or not raw:
            extra = " or a range {start: N, count: N}" if key == "seed" else ""
            self.fail(path, f"expected a non-empty list of values{extra}, got {short_repr(raw)}")
            return None
        result = []
        for i, value in enumerate(raw):
            try:
                value = self.checker.convert(value, tp, path + (i,), meta)
            except Invalid:
                continue
            if key == "size" and not self._size(value, path + (i,)):
                continue
            if key == "sampler":
                self._sampler(value, path + (i,))
            result.append(value)
        return result

    def _size(self, value: str, path: KeyPath) -> bool:
        """A WIDTHxHEIGHT value whose sides obey the width/height rules."""
        match = SIZE_PATTERN.fullmatch(value)
        if not match:
            self.fail(path, f"expected WIDTHxHEIGHT such as 512x768, got {short_repr(value)}")
            return False
        ok = True
        for side, number in zip(("width", "height"), match.groups()):
            try:
                self.checker.convert(int(number), int, path, FIELD_AXES[side][1])
            except Invalid:
                ok = False
        return ok

    def _seed_range(self, raw: dict, path: KeyPath) -> SeedRange | None:
        @dataclass
        class SeedRangeSpec:
            start: int = field(default=0, metadata=_m(min=0, max=MAX_SEED))
            count: int = field(default=1, metadata=_m(min=1))
            step: int = field(default=1, metadata=_m(min=1))

        try:
            r = self.checker.dataclass(raw, SeedRangeSpec, path)
        except Invalid:
            return None
        if r.start + (r.count - 1) * r.step > MAX_SEED:
            self.fail(path, f"the range passes the largest seed {MAX_SEED}")
            return None
        return SeedRange(r.start, r.count, r.step)

    def _group(self, values: dict, spec: JobSpec) -> list[Axis]:
        """Cross the axes as a product, except the names of a zip group, walked together."""
        group_of: dict[str, int] = {}
        for g, names in enumerate(spec.zip):
            lengths = {}
            for i, name in enumerate(names):
                path = ("zip", g, i)
                if name not in spec.sweep:
                    self.fail(path, f"'{name}' is not a sweep axis{did_you_mean(name, spec.sweep)}")
                elif name in group_of:
                    self.fail(path, f"'{name}' is already zipped in group {group_of[name]}")
                elif name in values:
                    group_of[name] = g
                    lengths[name] = len(values[name])
            if len(set(lengths.values())) > 1:
                shown = ", ".join(f"{n}: {n_}" for n, n_ in lengths.items())
                self.fail(("zip", g), f"zipped axes must have the same length ({shown})")
        axes, placed = [], set()
        for name in values:
            if name in placed:
                continue
            if name in group_of:
                names = [n for n in values if group_of.get(n) == group_of[name]]
            else:
                names = [name]
            placed.update(names)
            axes.append(Axis(tuple(names), tuple(values[n] for n in names)))
        return axes


def _numeric_type(tp) -> type | None:
    """int or float for a number type (optional or not), else None."""
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    for key in ("unet", "transformer", "prior"):
        if isinstance(data.get(key), list) and len(data[key]) == 2:
            return data[key][1]
    return None


def _yaml_key(key):
    """Keyframe keys arrive as text; marks were recorded under the YAML's own (int) key."""
    return int(key) if _FRAME.fullmatch(str(key)) else key


def _as_plain(parsed: Any, raw: dict) -> dict:
    """Options as plain data for item hashing: every field, defaults included."""
    import dataclasses

    if dataclasses.is_dataclass(parsed):
        return dataclasses.asdict(parsed)
    return dict(raw)
