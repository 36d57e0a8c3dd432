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


def expand_prompts(templates: list[str], wildcards: str | None) -> list[tuple[str, str]]:
    """Every combination of each dynamicprompts template, as (template, prompt) pairs."""
    if not any(_has_syntax(t) for t in templates):
        return [(t, t) for t in templates]
    from dynamicprompts.generators import CombinatorialPromptGenerator
    from dynamicprompts.wildcards import WildcardManager

    generator = CombinatorialPromptGenerator(WildcardManager(wildcards) if wildcards else WildcardManager(None))
    pairs = []
    for index, template in enumerate(templates):
        if not _has_syntax(template):
            pairs.append((template, template))
            continue
        try:
            prompts = generator.generate(template, max_prompts=MAX_PROMPT_VARIANTS + 1)
        except Exception as exc:  # pyparsing raises several types for bad syntax
            raise PromptError(f"bad prompt template {template!r}: {exc}", index) from None
        missing = re.findall(r"__([\w/*-]+)__", " ".join(prompts[:1]))
        if missing:
            where = f" in {wildcards}" if wildcards else " (set 'wildcards:' to a folder of NAME.txt files)"
            raise PromptError(f"wildcard '{missing[0]}' not found{where}", index)
        if len(prompts) > MAX_PROMPT_VARIANTS:
            raise PromptError(f"template {template!r} expands to more than {MAX_PROMPT_VARIANTS} prompts", index)
        pairs.extend((template, p) for p in prompts)
    return pairs


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
            from dynamicprompts.parser.parse import parse

            try:
                self._parsed[template] = parse(template)
            except Exception as exc:  # pyparsing raises several types
                raise PromptError(f"bad prompt template {template!r}: {exc}") from None
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
        fields = self._fields(values)
        return Item(index=index, **fields)

    def _fields(self, values: dict) -> dict:
        axes = {k: (v[1] if k == "prompt" else v) for k, v in values.items()}
        extra = {}
        if self.timeline is not None:
            frame = self.timeline.frame(values["frame"])
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
        if info is not None and (base.model_family or info.memory.get("t5") == "off" or info.memory.get("vae_tiling")):
            # settings that change how the model computes: part of the id (defaults add nothing, ids stay)
            extra["model"] = {"family": info.family, "t5": info.memory.get("t5"),
                              "vae_tiling": info.memory.get("vae_tiling")}
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
