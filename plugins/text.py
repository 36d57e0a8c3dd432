"""The built-in text conditioner: the model family's prompt conditioning for each item."""

from __future__ import annotations

from dataclasses import dataclass, field

from sdbatch import hookimpl
from sdbatch.api import Conditioner


@dataclass
class TextOptions:
    clip_skip: int = field(default=1, metadata={"min": 1, "max": 12, "help": "1 uses the last layer, 2 the one before (A1111's Clip skip)"})


class TextConditioner(Conditioner):
    """Encodes prompt and negative prompt with the model family's text encoders."""

    name = "text"
    description = "text conditioning of prompt and negative prompt (the model family's encoders)"
    Options = TextOptions

    def condition(self, items, options, model, state) -> None:
        state.prompt = stack_rows([prompt_conditioning(model, item.prompt, opt) for item, opt in zip(items, options)])
        state.negative = stack_rows([prompt_conditioning(model, item.negative_prompt, opt)
                                     for item, opt in zip(items, options)])

    def check(self, options, job) -> list[str]:
        if options.clip_skip == 1:
            return []
        return [family.why_not("clip_skip") for family in job_families(job) if "clip_skip" not in family.capabilities]


def prompt_conditioning(model, text: str, options) -> dict:
    """One prompt's conditioning (name -> tensor), cached per model."""
    return model.encode_prompt(text, clip_skip=options.clip_skip)


def stack_rows(conditionings: list[dict]) -> dict:
    """Per-prompt conditionings (name -> tensor) as rows (name -> tensor with a batch dimension)."""
    import torch

    return {name: torch.stack([c[name] for c in conditionings]) for name in conditionings[0]}


def clip_skip_of(item) -> int:
    """The Clip skip an item's text conditioner uses (1 when it has none)."""
    return next((use.options.get("clip_skip", 1) for use in item.conditioners if use.name == "text"), 1)


def job_families(job) -> list:
    """The Family objects of a validated job's models."""
    return [job.registry.require("family", info.family).obj for info in job.plan.models.values() if info.family]


@hookimpl(trylast=True)
def register_conditioners(register):
    """The text conditioner every job uses unless it lists others."""
    register(TextConditioner(), aliases=("prompt",))
