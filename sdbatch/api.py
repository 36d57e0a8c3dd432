"""The objects plugins register and the work items they receive.

Importing this module imports no torch: plans and validation use it too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class NoOptions:
    """Options of a plugin that takes none."""


# ---------------------------------------------------------------- work items
#: Item fields that decide an item's pixels, and so its id.
CONTENT_FIELDS = (
    "model", "prompt", "negative_prompt", "seed", "steps", "guidance", "sampler",
    "width", "height", "conditioners", "postprocess", "extra",
)


@dataclass(frozen=True)
class PluginUse:
    """A plugin named in a job, with its validated options as plain data."""

    name: str
    options: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {self.name: self.options}


@dataclass(frozen=True)
class Item:
    """Everything needed to render one output. Its id is a hash of that content."""

    index: int
    model: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    sampler: str
    width: int
    height: int
    conditioners: tuple = ()  # of PluginUse
    postprocess: tuple = ()  # of PluginUse
    extra: dict = field(default_factory=dict)  # room for features such as animation frames
    axes: dict = field(default_factory=dict)  # axis name -> value, for labels and filters
    template: str = ""  # the prompt before wildcard expansion

    @property
    def id(self) -> str:
        """Stable 16-hex-digit id: sha256 of the canonical JSON of the content fields."""
        cached = self.__dict__.get("_id")
        if cached is None:
            canonical = json.dumps(self.content(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            cached = hashlib.sha256(canonical.encode()).hexdigest()[:16]
            object.__setattr__(self, "_id", cached)
        return cached

    def content(self) -> dict:
        """The fields that decide the pixels (CONTENT_FIELDS), as plain data: what the id hashes."""
        return {name: _plain(getattr(self, name)) for name in CONTENT_FIELDS}

    def batch_key(self) -> tuple:
        """Items with equal keys can share one denoising loop."""
        return (self.model, self.width, self.height, self.sampler, self.steps,
                tuple(c.name for c in self.conditioners), json.dumps(self.extra.get("batch")))

    def to_json(self) -> dict:
        record = {"id": self.id, "index": self.index}
        for f in dataclasses.fields(self):
            if f.name != "index":
                record[f.name] = _plain(getattr(self, f.name))
        return record


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float)):
        return value
    if isinstance(value, PluginUse):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- plugin objects
class Plugin:
    """Base for named, configurable plugin objects.

    ``Options`` is a dataclass; sdbatch validates a job's options against it (unknown
    keys, types, ranges) and every field can be a sweep axis (``<name>.<field>``).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: Model-family capabilities this plugin needs (see ``Family.capabilities``); a job whose
    #: model's family lacks one fails validation at the plugin's line.
    requires: ClassVar[tuple] = ()

    def parse_options(self, options: dict) -> Any:
        """The Options dataclass for an item's plain-data options."""
        return self.Options(**options)

    def requirements(self, options) -> tuple:
        """The family capabilities a use with these options needs (default: ``requires``)."""
        return self.requires

    def a1111_fields(self, item, options) -> list:
        """(name, value) pairs a conditioner or post-processor adds to an item's A1111 ``parameters`` text.

        Called by the image writers with the item and this use's parsed Options; in order.
        A name in A1111's own field list (``Denoising strength``) goes where A1111 puts it, any
        other after A1111's fields; ``{n}`` in a name numbers repeated units from 0
        (``ControlNet {n}`` -> ``ControlNet 0``, ``ControlNet 1``). Values are text or numbers.
        """
        return []


@dataclass
class ModelInfo:
    """What a loader learned about a model reference without loading weights."""

    ref: str  # as written in the job
    location: str  # resolved folder, file or hub id
    kind: str  # "diffusers-folder", "single-file", "hub", ...
    loader: str = ""  # name of the loader that accepted it
    defaults: dict = field(default_factory=dict)  # width, height, steps, guidance, sampler
    allow_pickle: bool = False
    config: str | None = None
    family: str = ""  # the model family (sd1, sdxl, sd3, flux, or a plugin's), detected or as the job says
    memory: dict = field(default_factory=dict)  # the job's memory options (offload, tiling, t5 ...)


@dataclass
class ModelRequest:
    """A job's model reference and the job settings that affect how it loads."""

    ref: str
    folder: str = "."  # the job file's folder: relative paths resolve against it
    allow_pickle: bool = False
    config: str | None = None  # a diffusers folder or hub id giving configs for single files
    family: str | None = None  # ``model_family:`` from the job: overrides detection


class ModelLoader:
    """Turns a ``model:`` reference into loaded components.

    ``describe(request)`` is called while planning: it must be cheap (no weights read)
    and return a ModelInfo, or None when this loader does not handle the reference; it
    raises ValueError with a message for a reference it owns but cannot use (a missing
    file, a pickle checkpoint without ``allow_pickle``).
    ``load(info, device, dtype, family)`` returns a ``sdbatch.models.Model`` on that device;
    ``family`` is the ``Family`` the job's model was detected (or declared) as.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def describe(self, request: ModelRequest) -> ModelInfo | None:
        raise NotImplementedError

    def load(self, info: ModelInfo, device: str, dtype: str, family):
        raise NotImplementedError


@dataclass
class Sampler:
    """A named scheduler recipe: a diffusers scheduler class plus config overrides."""

    name: str
    scheduler: str | type  # diffusers class name, or a scheduler class
    config: dict = field(default_factory=dict)
    description: str = ""
    kind: str = "eps"  # "eps" for noise-prediction families (SD 1.x, SDXL), "flow" for flow matching (SD3, FLUX.1)

    def create(self, base_config: dict):
        """A fresh scheduler built from the model's scheduler config plus this recipe."""
        cls = self.scheduler
        if isinstance(cls, str):
            import diffusers

            cls = getattr(diffusers, cls)
        return cls.from_config(base_config, **self.config)


class Conditioner(Plugin):
    """Adds conditioning for a batch of items to the render's ``RenderState``.

    ``condition(items, options, model, state)`` is called once per batch, in job order,
    after the scheduler and timesteps exist (``state.timesteps``); ``options`` holds each
    item's parsed Options. It may fill ``state.prompt`` / ``state.negative`` (the text
    conditioner does), set rows of ``state.latents`` or ``state.init_latents``, and may
    return an ``Extension`` whose methods the denoising loop calls.
    """

    #: Options that must be equal across a batch (e.g. img2img strength, which decides the
    #: timesteps): items that differ in them are rendered in different batches.
    batch_options: ClassVar[tuple] = ()

    def condition(self, items, options, model, state) -> "Extension | None":
        raise NotImplementedError

    def strength(self, options) -> float | None:
        """The fraction of the schedule a batch runs (img2img's denoising strength), or None for all.

        Asked before timesteps are made; it must be a batch option."""
        return None

    def check(self, options, job) -> list[str]:
        """Problems with this use in a validated job (e.g. a ControlNet that does not fit the
        model), reported at the use's YAML line; read configs only, load no weights."""
        return []


@dataclass
class Direction:
    """One edit direction: a tensor in a named space, with what is needed to apply and reuse it.

    ``space`` is "text" (added to prompt embeddings), "latent" (added to x_t at
    ``meta["timestep"]``, a fraction of the schedule) or "guidance" (a prompt steering
    sampling, as SEGA does). ``meta`` values are plain data; they are saved with the tensor.
    """

    name: str
    space: str
    tensor: Any = None
    meta: dict = field(default_factory=dict)


class DirectionFinder(Plugin):
    """Finds edit directions for an edit job's ``directions:`` entries of this ``kind`` (its name).

    ``labels(options)`` is called while planning (no model): one label per direction it
    will find. ``find(model, source, options)`` returns that many ``Direction`` objects
    for a source (a dict with prompt, negative_prompt, seed, guidance, steps and, for
    latent spaces, ``latents_at(fraction)``); sdbatch caches them per source and finder.
    """

    def labels(self, options) -> list[str]:
        return [self.name]

    def find(self, model, source, options) -> list:
        raise NotImplementedError


class PostProcessor(Plugin):
    """Transforms one decoded PIL image: ``apply(image, options, item) -> image``."""

    def apply(self, image, options, item):
        raise NotImplementedError


class Writer(Plugin):
    """Stores results. One instance per run: ``Writer(options, context)``.

    ``write(result)`` is called for each rendered item and returns the files it wrote
    (relative paths); ``finish(entries)`` is called once at the end of a run with the
    manifest entries of every finished item (also those of earlier, resumed runs) and
    returns the run-level files it wrote (grids, videos, indexes).
    ``check(job, uses)`` may return problems for the job (e.g. a missing axis) at validation.
    """

    #: True for writers that write a file per item (other writers may read those files).
    writes_images: ClassVar[bool] = False
    #: True when ``write`` may run in several threads and processes at once, in any order, each
    #: with its own instance made from the same options (so it keeps no state other calls need):
    #: sdbatch then writes in a pool of threads and, under Ray, on the workers. False: one at a
    #: time, in the driver (a writer that does not override ``write`` counts as True).
    parallel: ClassVar[bool] = False

    def __init__(self, options: Any = None, context: Any = None):
        self.options = options
        self.context = context

    @classmethod
    def check(cls, options: Any, job: Any) -> list[str]:
        """Problems with these options in this job (messages), checked while validating."""
        return []

    def write(self, result) -> list[str]:
        return []

    def progress_note(self) -> str:
        """A few words shown beside the progress bar (e.g. "shards 3/40"), or an empty string."""
        return ""

    def covers(self, item) -> bool:
        """True when this writer stored ``item`` durably by its own record (e.g. a finished shard),
        so a resumed run need not render it for this writer even without a manifest entry."""
        return False

    def finish(self, entries) -> list[str]:
        return []


# ---------------------------------------------------------------- the render contract
class BatchSplit(Exception):
    """Raised by a conditioner when the rows of a batch cannot share one loop (e.g. prompts of
    other lengths): ``groups`` lists row indices that can. The renderer renders each group on
    its own; rows are independent, so no pixel changes."""

    def __init__(self, groups: list):
        super().__init__(f"batch split into {len(groups)} groups")
        self.groups = groups


class Extension:
    """What a conditioner adds inside the denoising loop. Every method is optional.

    The renderer calls them in this order: ``start`` once, then for every step
    ``before_step`` -> ``model_input`` -> ``denoiser_kwargs`` -> (denoiser, guidance) ->
    ``guide`` -> (scheduler step) -> ``after_step``; after decoding, ``finish`` per row, then
    ``finish_batch`` once (before the items' post-processors).
    Rows are the batch's items; under classifier-free guidance the denoiser sees them
    twice, ``[uncond rows; cond rows]`` (``state.for_guidance`` doubles a per-row tensor).
    """

    def start(self, state) -> None:
        """Called once before the loop, after ``state.latents`` holds x at the first step."""

    def before_step(self, step: int, t, latents):
        """Latents (rows) before this step's denoiser call, e.g. moved along an edit direction."""
        return latents

    def model_input(self, step: int, t, x):
        """The denoiser's input (doubled rows under guidance), e.g. with extra channels."""
        return x

    def denoiser_kwargs(self, step: int, t, x, cond: dict) -> dict:
        """Extra keyword arguments for this step's denoiser call (``x`` and ``cond`` as it gets them).

        Values from several extensions under one key are added (ControlNet residuals sum)."""
        return {}

    def guide(self, step: int, t, x, uncond, text):
        """A term added to the guided prediction (rows), e.g. semantic guidance; None for none."""
        return None

    def after_step(self, step: int, t, latents):
        """Latents (rows) after the scheduler step, e.g. the unmasked area kept (inpainting)."""
        return latents

    def finish(self, row: int, image):
        """The decoded PIL image of one row, changed (e.g. the original pasted outside a mask)."""
        return image

    def finish_batch(self, images: list, latents) -> list:
        """All rows' finished PIL images (items only, no padding) and the loop's final latents
        (rows, packed as the denoiser sees them); returns the images, e.g. after a hires fix's
        second pass at a larger size (``state.renderer.refine``)."""
        return images


def noised(scheduler, clean, noise, timestep):
    """Clean latents noised to ``timestep`` with the given noise, as diffusers' image-to-image pipelines do.

    Flow-matching schedulers mix (``(1 - sigma) x_0 + sigma noise``); diffusion ones add noise."""
    timestep = timestep.reshape(1)
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(clean, timestep, noise)
    return scheduler.add_noise(clean, noise, timestep.repeat(len(noise)))


@dataclass
class RenderState:
    """One batch as the renderer and conditioners share it (rows in item order).

    ``prompt`` and ``negative`` map the family's conditioning names (e.g.
    ``encoder_hidden_states``, ``pooled``) to tensors with one row per item.
    """

    items: list
    model: Any
    registry: Any = None
    scheduler: Any = None
    timesteps: Any = None
    strength: float | None = None  # img2img: the fraction of the schedule run
    cfg: bool = False  # the denoiser sees [uncond rows; cond rows]
    prompt: dict = field(default_factory=dict)
    negative: dict = field(default_factory=dict)
    latents: list = field(default_factory=list)  # per row: a given x_T, or None for the item's seeded noise
    init_latents: list = field(default_factory=list)  # per row: clean latents to start from (img2img), or None
    noise: Any = None  # (rows, ...) the items' x_T, once drawn (in the family's packed layout)
    x: Any = None  # latents at the first step: noise times the scheduler's sigma, unless an extension changed it
    generators: list = field(default_factory=list)  # per row: the item's CPU generator
    outputs: list = field(default_factory=list)  # per row: extra results for writers (directions, maps)
    extra: dict = field(default_factory=dict)  # anything conditioners share with each other
    renderer: Any = None  # the Renderer, for conditioners that need a trajectory (edits)

    def for_guidance(self, value):
        """A per-row tensor (or list of them) repeated for the ``[uncond; cond]`` rows when guidance is on."""
        if not self.cfg:
            return value
        if isinstance(value, (list, tuple)):
            return type(value)(self.for_guidance(v) for v in value)
        import torch

        return torch.cat([value, value])


# ---------------------------------------------------------------- model families
class Family:
    """One kind of model: its components, prompt encoding, denoiser call and latent layout.

    The renderer knows no model: it asks the item's family. A model's family is detected
    from ``model_index.json`` (``pipeline_classes``) or a single file's keys
    (``matches_keys``); ``model_family:`` in a job overrides detection. Methods that take
    ``model`` receive a loaded ``sdbatch.models.Model`` (components by name:
    ``model.unet``, ``model.text_encoder_2`` ...).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: The diffusers pipeline class that loads a folder, a hub id or a single file of it.
    pipeline: ClassVar[str] = ""
    #: ``_class_name`` values in model_index.json that mean this family.
    pipeline_classes: ClassVar[tuple] = ()
    #: Pipeline components the renderer uses (the loaded ``Model`` holds these).
    components: ClassVar[tuple] = ()
    #: "eps" families take the diffusion samplers; "flow" families the flow-matching ones.
    sampler_kind: ClassVar[str] = "eps"
    #: What applies to it: "cfg", "negative_prompt", "clip_skip", "controlnet", "img2img",
    #: "inpaint", "text_edit", "local_basis", "sega", "attention", "t5".
    capabilities: ClassVar[frozenset] = frozenset()
    #: Why a missing capability does not apply (shown at the YAML line that asks for it).
    limits: ClassVar[dict] = {}
    #: Settings when neither the job nor the model's sdbatch.json gives them.
    defaults: ClassVar[dict] = {}
    #: A package folder (``sdbatch.configs``) with the small config files that load its single files offline.
    config_folder: ClassVar[str] = ""

    def matches_keys(self, keys) -> bool:
        """True when a single-file checkpoint with these tensor names is of this family."""
        return False

    def why_not(self, capability: str) -> str:
        return self.limits.get(capability, f"{self.description or self.name} does not support {capability}")

    def load_kwargs(self, memory: dict) -> dict:
        """Extra keyword arguments for the pipeline's from_pretrained / from_single_file."""
        return {}

    def encode_prompt(self, model, text: str, options: dict) -> dict:
        """The conditioning of one prompt: name -> tensor without a batch dimension."""
        raise NotImplementedError

    def encode_prompts(self, model, texts: list, options: dict) -> list:
        """The conditionings of several prompts, in order (what the text conditioner asks per batch).

        The default encodes them one by one. A family overrides it to put them through its text
        encoders together, as long as each prompt still gets exactly what ``encode_prompt`` gives
        it (fixed-shape calls on a GPU), since conditionings are cached per prompt."""
        return [self.encode_prompt(model, text, options) for text in texts]

    def latent_shape(self, model, width: int, height: int) -> tuple:
        """(channels, height, width) of an item's initial noise, as the family's pipeline draws it."""
        factor = model.vae_scale_factor
        return (model.latent_channels, height // factor, width // factor)

    def pack(self, model, latents):
        """Latents (rows, C, h, w) into the layout the denoiser and scheduler work in."""
        return latents

    def unpack(self, model, latents, width: int, height: int):
        """The inverse of ``pack``, before decoding."""
        return latents

    def set_timesteps(self, model, scheduler, steps: int, width: int, height: int) -> None:
        """Prepare ``scheduler`` for ``steps`` steps at this image size."""
        scheduler.set_timesteps(steps, device=model.device)

    def uses_cfg(self, model) -> bool:
        """False for guidance-distilled models that take the guidance scale as an input (FLUX.1)."""
        return True

    def denoise(self, model, x, t, cond: dict, guidance, width: int = 0, height: int = 0, **kwargs):
        """The denoiser's prediction for input ``x`` (rows as given) at timestep ``t``.

        ``cond`` holds the conditioning rows (doubled under guidance), ``guidance`` the
        per-row guidance scales (a tensor), ``width``/``height`` the image size in pixels,
        ``kwargs`` what extensions added."""
        raise NotImplementedError

    def unet_inputs(self, model, x, cond: dict, width: int, height: int) -> dict:
        """U-Net families: the U-Net's conditioning keyword arguments for rows ``x`` (local-basis
        edits and ControlNets call the U-Net's parts with them). Needed for ``local_basis``."""
        raise NotImplementedError(f"{self.description or self.name} has no U-Net")

    #: The diffusers class of this family's ControlNets (``ControlNetModel``, ``SD3ControlNetModel`` ...).
    controlnet_class: ClassVar[str] = ""
    #: Config keys a ControlNet must share with the denoiser to steer it: key -> what it means.
    controlnet_fit: ClassVar[dict] = {}

    def control_input(self, model, net, maps, generators):
        """What ``net`` takes as its control image, from maps (rows, 3, H, W) in 0..1 at the output size.

        U-Net ControlNets take the map itself; transformer ControlNets mostly take its VAE
        latents. It is computed once per batch, before the loop."""
        return maps

    def control(self, model, net, x, t, cond: dict, guidance, control, width: int, height: int) -> dict:
        """Run ``net`` for this step: the denoiser keyword arguments that carry its residuals.

        Arguments are those of ``denoise`` plus ``control`` (``control_input``'s value, rows as
        ``x``). Every tensor in the result is scaled per row by the caller (ControlNet scale,
        guidance start and end), and several nets' results add up."""
        raise NotImplementedError(f"{self.description or self.name} has no ControlNet support")

    def prepare(self, model) -> None:
        """Called once after loading (memory options, dtype fixes)."""
