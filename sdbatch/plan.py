"""The lazy, deterministic plan: axes crossed as a mixed-radix number, one Item per index.

Nothing here imports torch or loads a model; counting is arithmetic, so a plan of
millions of items is never materialised.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

from .api import Item
from .errors import shorten

SIZE_PATTERN = re.compile(r"(\d+)x(\d+)")
MAX_PROMPT_VARIANTS = 100_000

#: Used when neither the job nor the model's sdbatch.json sets a value.
FALLBACK_DEFAULTS = {"width": 512, "height": 512, "steps": 20, "guidance": 7.0, "sampler": "Euler a"}


@dataclass(frozen=True)
class SeedRange(Sequence):
    """``count`` seeds from ``start`` every ``step``, without a list in memory."""

    start: int
    count: int
    step: int = 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.start + index * self.step


@dataclass(frozen=True)
class Axis:
    """One dimension of the plan: one name, or several zipped names walked together."""

    names: tuple
    values: tuple  # one sequence per name, all of the same length

    def __len__(self) -> int:
        return len(self.values[0])

    def at(self, index: int) -> dict:
        return {name: seq[index] for name, seq in zip(self.names, self.values)}


class PromptError(ValueError):
    def __init__(self, message: str, index: int = 0):
        super().__init__(message)
        self.index = index


#: A template's text is parsed by pyparsing at about 2 ms per alternative: bound it before parsing.
MAX_TEMPLATE_CHARS = 20_000
MAX_TEMPLATE_ALTERNATIVES = 1000
_WILDCARD = re.compile(r"__(.*?)__")


def check_template_text(template: str) -> None:
    """Refuse, before any parsing, a template too long to parse quickly or naming a wildcard outside its folder."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise PromptError(f"prompt template of {len(template):,} characters; the limit is {MAX_TEMPLATE_CHARS:,}")
    if "{" in template and template.count("|") > MAX_TEMPLATE_ALTERNATIVES:
        raise PromptError(f"prompt template with {template.count('|'):,} alternatives; the limit is "
                          f"{MAX_TEMPLATE_ALTERNATIVES:,}: put long lists in a wildcard file (__name__)")
    for name in _WILDCARD.findall(template):
        parts = name.replace("\\", "/").split("/")
        if ".." in parts or name.startswith(("/", "~")) or ":" in name or not name.strip("*/"):
            raise PromptError(f"wildcard '__{shorten(name, 40)}__' names a file outside the wildcards folder; "
                              "use a name relative to it (colors, styles/art)")


def expand_prompts(templates: list[str], wildcards: str | None) -> list[tuple[str, str]]:
    """Every combination of each dynamicprompts template, as (template, prompt) pairs.

    The variants are counted from the parsed template before any is generated, so a
    template of millions of variants is refused at once.
    """
    if not any(_has_syntax(t) for t in templates):
        return [(t, t) for t in templates]
    from dynamicprompts.enums import SamplingMethod
    from dynamicprompts.sampling_context import SamplingContext
    from dynamicprompts.wildcards import WildcardManager

    context = SamplingContext(default_sampling_method=SamplingMethod.COMBINATORIAL,
                              wildcard_manager=WildcardManager(wildcards) if wildcards else WildcardManager(None))
    pairs = []
    for index, template in enumerate(templates):
        if not _has_syntax(template):
            pairs.append((template, template))
            continue
        try:
            check_template_text(template)
            command = _parse(template)
        except PromptError as exc:
            raise PromptError(str(exc), index) from None
        if (variant_count(command) or 0) > MAX_PROMPT_VARIANTS:
            raise PromptError(f"template {shorten(template)!r} expands to more than {MAX_PROMPT_VARIANTS:,} prompts",
                              index)
        try:
            prompts = [str(p) for p in context.sample_prompts(command, MAX_PROMPT_VARIANTS + 1)]
        except Exception as exc:  # noqa: BLE001 - a wildcard file dynamicprompts cannot read
            raise PromptError(f"bad prompt template {shorten(template)!r}: {shorten(str(exc))}", index) from None
        missing = re.findall(r"__([\w/*-]+)__", " ".join(prompts[:1]))
        if missing:
            where = f" in {wildcards}" if wildcards else " (set 'wildcards:' to a folder of NAME.txt files)"
            raise PromptError(f"wildcard '{missing[0]}' not found{where}", index)
        if len(prompts) > MAX_PROMPT_VARIANTS:
            raise PromptError(f"template {shorten(template)!r} expands to more than {MAX_PROMPT_VARIANTS:,} prompts",
                              index)
        pairs.extend((template, p) for p in prompts)
    return pairs


def _parse(template: str):
    """The dynamicprompts command tree of a template (its log is quiet: sdbatch reports problems itself)."""
    import logging

    from dynamicprompts.parser.parse import parse

    logging.getLogger("dynamicprompts").addHandler(logging.NullHandler())
    try:
        return parse(template)
    except Exception as exc:  # noqa: BLE001 - pyparsing raises several types
        raise PromptError(f"bad prompt template {shorten(template)!r}: {shorten(str(exc))}") from None


def variant_count(command) -> int | None:
    """How many prompts a parsed template gives at most (capped just past the limit); None if unknown."""
    from dynamicprompts.commands import LiteralCommand, SequenceCommand, VariantCommand

    cap = MAX_PROMPT_VARIANTS + 1
    if isinstance(command, LiteralCommand):
        return 1
    if isinstance(command, SequenceCommand):
        total = 1
        for token in command.tokens:
            count = variant_count(token)
            if count is None:
                return None
            total = min(cap, total * count)
        return total
    if isinstance(command, VariantCommand):
        counts = [variant_count(option.value) for option in command.variants]
        if None in counts:
            return None
        options = min(cap, sum(counts))
        low, high = min(command.min_bound, len(counts)), min(command.max_bound, len(counts))
        total = 0
        for picks in range(low, high + 1):  # ordered picks bound the combinations dynamicprompts makes
            ways = 1
            for taken in range(picks):
                ways = min(cap, ways * max(0, options - taken))
            total = min(cap, total + ways)
        return total
    return None  # wildcards and variables: generated with a cap instead


class PromptSampler:
    """One random variant of a template per item, reproducible from the item's seed (dynamicprompts)."""

    def __init__(self, wildcards: str | None):
        self.wildcards = wildcards
        self._parsed: dict = {}
        self._manager = None

    def sample(self, template: str, seed: int) -> str:
        if not _has_syntax(template):
            return template
        import random

        from dynamicprompts.enums import SamplingMethod
        from dynamicprompts.sampling_context import SamplingContext

        command = self._parse(template)
        context = SamplingContext(default_sampling_method=SamplingMethod.RANDOM, wildcard_manager=self._wildcards(),
                                  rand=random.Random(f"{template}\0{seed}"))  # str seeds hash stably
        prompt = str(next(iter(context.sample_prompts(command, 1))))
        missing = re.findall(r"__([\w/*-]+)__", prompt)
        if missing:
            raise PromptError(f"wildcard '{missing[0]}' not found" + (f" in {self.wildcards}" if self.wildcards else ""))
        return prompt

    def _parse(self, template: str):
        if template not in self._parsed:
            check_template_text(template)
            self._parsed[template] = _parse(template)
        return self._parsed[template]

    def _wildcards(self):
        if self._manager is None:
            from dynamicprompts.wildcards import WildcardManager

            self._manager = WildcardManager(self.wildcards)
        return self._manager


def _has_syntax(text: str) -> bool:
    return "{" in text or "__" in text


def slug(text: str, limit: int = 60) -> str:
    """A filename-safe short form of a prompt: lowercase words joined by '-'."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    out = "-".join(words)[:limit].rstrip("-")
    return out or "empty"


class Plan:
    """Items in a fixed order: the first axis varies slowest, the last fastest."""

    def __init__(self, base, axes: list[Axis], models: dict, conditioners=(), postprocess=(), timeline=None,
                 edit=None, inputs=None, batch_options=None, option_axes=None):
        self.base = base
        # axis name -> (plugin name, option, [index, key ...]): axes named by job keys (``loras[0].weight``)
        self.option_axes = option_axes or {}
        self.inputs = inputs  # an inputs.InputFiles: which options name images (hashed into extra)
        self.batch_options = batch_options or {}  # conditioner -> options a batch must share
        self.timeline = timeline  # an animation.Timeline: frames become the last (fastest) axis
        self.edit = edit  # an editing.EditPlan: source, direction and strength become axes
        self._sampler = PromptSampler(getattr(base, "wildcards", None))
        if timeline is not None:
            axes = list(axes) + [Axis(("frame",), (range(timeline.frames),))]
        if edit is not None:
            axes = list(axes) + [Axis(("source",), (list(edit.sources),)), Axis(("direction",), (list(edit.directions),)),
                                 Axis(("strength",), (edit.strengths,))]
        self.axes = list(axes)
        self.models = models
        self.conditioners = tuple(conditioners)
        self.postprocess = tuple(postprocess)
        self._lengths = [len(axis) for axis in reversed(self.axes)]  # fastest-varying first
        self._count = math.prod(self._lengths)

    def __len__(self) -> int:
        return self._count

    @property
    def size(self) -> int:
        """The item count as an exact int (len() stops at 2**63)."""
        return self._count

    count = __len__

    def __iter__(self) -> Iterator[Item]:
        return self.items()

    def items(self, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        stop = len(self) if stop is None else min(stop, len(self))
        for index in range(start, stop):
            yield self.item_at(index)

    def axis_values(self, index: int) -> dict:
        """The value of every axis at a plan index (mixed-radix decoding)."""
        if not 0 <= index < self._count:
            raise IndexError(index)
        values = {}
        for axis, length in zip(reversed(self.axes), self._lengths):
            index, position = divmod(index, length)
            values.update(axis.at(position))
        return values

    def item_at(self, index: int) -> Item:
        values = self.axis_values(index)
        fields = self._fields(values, index)
        return Item(index=index, **fields)

    def segment_key(self, index: int, segment) -> str:
        """The content key of the animation segment an item at ``index`` moves along (see animation.py)."""
        from .animation import segment_key

        frame = self.axis_values(index)["frame"]
        start = self.item_at(index - (frame - segment.first))  # frames are the fastest axis
        return segment_key(start.id, segment, self.timeline)

    def _fields(self, values: dict, index: int) -> dict:
        axes = {k: (v[1] if k == "prompt" else v) for k, v in values.items()}
        extra = {}
        if self.timeline is not None:
            frame = self.timeline.frame(values["frame"], lambda segment: self.segment_key(index, segment))
            values = {**values, **frame["fields"]}
            values["prompt"] = (frame["fields"]["prompt"], frame["fields"]["prompt"])
            extra["animation"] = frame["animation"]
        if self.edit is not None:
            edit = self.edit.fields(values["source"], values["direction"], values["strength"])
            values = {**values, **edit["fields"]}
            values["prompt"] = (edit["fields"]["prompt"], edit["fields"]["prompt"])
            extra["edit"] = edit["edit"]
        base = self.base
        model = values.get("model", base.model)
        defaults = dict(FALLBACK_DEFAULTS)
        info = self.models.get(model)
        if info is not None:
            defaults.update(info.defaults)
        template, prompt = values.get("prompt", (base.prompt, base.prompt))
        if base.prompt_sampling == "random" and "frame" not in values and "edit" not in extra:
            prompt = self._sampler.sample(template, values.get("seed", base.seed))
        fields: dict[str, Any] = {
            "model": model,
            "prompt": prompt,
            "template": template,
            "negative_prompt": values.get("negative_prompt", base.negative_prompt),
            "seed": values.get("seed", base.seed),
        }
        for name in ("steps", "guidance", "sampler", "width", "height"):
            fields[name] = values.get(name, getattr(base, name))
            if fields[name] is None:
                fields[name] = defaults[name]
        fields["guidance"] = float(fields["guidance"])
        fields["steps"] = int(round(fields["steps"]))
        if "size" in values:
            width, height = SIZE_PATTERN.fullmatch(values["size"]).groups()
            fields["width"], fields["height"] = int(width), int(height)
        speed = pixel_speed_options(info.memory) if info is not None else {}
        if info is not None and (base.model_family or info.memory.get("t5") == "off" or info.memory.get("vae_tiling")
                                 or speed):
            # settings that change how the model computes: part of the id (defaults add nothing, ids stay)
            extra["model"] = {"family": info.family, "t5": info.memory.get("t5"),
                              "vae_tiling": info.memory.get("vae_tiling"), **speed}
        fields["conditioners"] = _with_options(self.conditioners, values, self.option_axes)
        fields["postprocess"] = _with_options(self.postprocess, values)
        if self.inputs:
            files = self.inputs.of(fields["conditioners"], values.get("frame"))
            if files:
                extra["inputs"] = files
        batch = [[use.name, {name: use.options.get(name) for name in self.batch_options[use.name]}]
                 for use in fields["conditioners"] if use.name in self.batch_options]
        if batch:
            extra["batch"] = batch  # part of the batch key: items that differ here never share a loop
        fields["axes"] = axes
        fields["extra"] = extra
        return fields


def pixel_speed_options(memory: dict) -> dict:
    """The speed options that are set and can change pixels (another decoder, other kernels): part of the id."""
    found = {key: memory[key] for key in ("channels_last", "tiny_vae", "decode_batch") if memory.get(key)}
    if memory.get("compile", "off") != "off":
        found.update(compile=memory["compile"], compile_backend=memory.get("compile_backend", "inductor"))
    return found


def _with_options(uses: tuple, values: dict, option_axes: dict | None = None) -> tuple:
    """Plugin uses with swept options (``<name>.<option>`` axes, and ``option_axes`` paths) applied."""
    option_axes = option_axes or {}
    if not any("." in key or key in option_axes for key in values):
        return uses
    result = []
    for use in uses:
        prefix = use.name + "."
        changed = {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}
        options = {**use.options, **changed}
        for key, path in option_axes.items():
            if key in values and path[0] == use.name:
                options = _set_path(options, path[1:], values[key])
        result.append(replace(use, options=options) if options != use.options else use)
    return tuple(result)


def _set_path(data, path: tuple, value):
    """A copy of nested dicts/lists with ``data[path[0]][path[1]]... = value``."""
    if not path:
        return value
    copy = list(data) if isinstance(data, list) else dict(data)
    copy[path[0]] = _set_path(data[path[0]], path[1:], value)
    return copy
