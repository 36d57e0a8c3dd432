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
            content = {name: _plain(getattr(self, name)) for name in CONTENT_FIELDS}
            canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            cached = hashlib.sha256(canonical.encode()).hexdigest()[:16]
            object.__setattr__(self, "_id", cached)
        return cached

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

    def parse_options(self, options: dict) -> Any:
        """The Options dataclass for an item's plain-data options."""
        return self.Options(**options)


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


@dataclass
class ModelRequest:
    """A job's model reference and the job settings that affect how it loads."""

    ref: str
    folder: str = "."  # the job file's folder: relative paths resolve against it
    allow_pickle: bool = False
    config: str | None = None  # a diffusers folder or hub id giving configs for single files


class ModelLoader:
    """Turns a ``model:`` reference into loaded components.

    ``describe(request)`` is called while planning: it must be cheap (no weights read)
    and return a ModelInfo, or None when this loader does not handle the reference; it
    raises ValueError with a message for a reference it owns but cannot use (a missing
    file, a pickle checkpoint without ``allow_pickle``).
    ``load(info, device, dtype)`` returns a ``sdbatch.models.Model`` on that device.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def describe(self, request: ModelRequest) -> ModelInfo | None:
        raise NotImplementedError

    def load(self, info: ModelInfo, device: str, dtype: str):
        raise NotImplementedError


@dataclass
class Sampler:
    """A named scheduler recipe: a diffusers scheduler class plus config overrides."""

    name: str
    scheduler: str | type  # diffusers class name, or a scheduler class
    config: dict = field(default_factory=dict)
    description: str = ""

    def create(self, base_config: dict):
        """A fresh scheduler built from the model's scheduler config plus this recipe."""
        cls = self.scheduler
        if isinstance(cls, str):
            import diffusers

            cls = getattr(diffusers, cls)
        return cls.from_config(base_config, **self.config)


class Conditioner(Plugin):
    """Adds conditioning for a batch of items to a ``sdbatch.render.Conditioning``.

    ``condition(items, options, model, state)`` is called once per batch, in job order;
    ``options`` holds each item's parsed Options. Fill ``state.prompt_embeds`` (text)
    or ``state.extra`` (keyword arguments for the denoiser, e.g. ControlNet residuals).
    """

    #: Options that must be equal across a batch (e.g. img2img strength, which decides the
    #: timesteps): items that differ in them are rendered in different batches.
    batch_options: ClassVar[tuple] = ()

    def condition(self, items, options, model, state) -> None:
        raise NotImplementedError

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
