"""The built-in text conditioner: the model family's prompt conditioning for each item."""

from __future__ import annotations

from dataclasses import dataclass, field

from sdbatch import hookimpl
from sdbatch.api import BatchSplit, Conditioner


@dataclass
class TextOptions:
    clip_skip: int = field(default=1, metadata={"min": 1, "max": 12, "help": "1 uses the last layer, 2 the one before (A1111's Clip skip)"})
    t5_tokens: int = field(default=0, metadata={"min": 0, "max": 512, "help": "T5 sequence length (SD3, FLUX.1): "
                                                "0 is the pipeline's (SD3 256, FLUX.1 512); longer prompts are cut"})


class TextConditioner(Conditioner):
    """Encodes prompt and negative prompt with the model family's text encoders."""

    name = "text"
    description = "text conditioning of prompt and negative prompt (the model family's encoders)"
    Options = TextOptions

    def condition(self, items, options, model, state) -> None:
        encode_together(model, items, options)
        pairs = [equal_length(model, prompt_conditioning(model, item.prompt, opt),
                              prompt_conditioning(model, item.negative_prompt, opt), opt)
                 for item, opt in zip(items, options)]
        lengths = [pair[0]["encoder_hidden_states"].shape[0] for pair in pairs]
        if len(set(lengths)) > 1:  # long prompts of other chunk counts: rows cannot share one loop
            raise BatchSplit([[row for row, n in enumerate(lengths) if n == length] for length in dict.fromkeys(lengths)])
        state.prompt = stack_rows([prompt for prompt, _ in pairs])
        state.negative = stack_rows([negative for _, negative in pairs])

    batch_options = ("t5_tokens",)  # one sequence length per batch

    def requirements(self, options) -> tuple:
        return (("clip_skip",) if options.clip_skip > 1 else ()) + (("t5",) if options.t5_tokens else ())


def encode_together(model, items, options) -> None:
    """Encode the batch's prompts and negative prompts in one call per set of options (a GPU puts
    them through its text encoders together); what follows reads them from the model's cache."""
    texts: dict = {}
    for item, opt in zip(items, options):
        texts.setdefault(_settings(opt), []).extend((item.prompt, item.negative_prompt))
    for settings, group in texts.items():
        model.encode_prompts(list(dict.fromkeys(group)), **dict(settings))


def _settings(options) -> tuple:
    """The encoding options of a text conditioner's options, as ``Model.encode_prompt`` takes them."""
    extra = (("t5_tokens", options.t5_tokens),) if getattr(options, "t5_tokens", 0) else ()
    return (("clip_skip", options.clip_skip), *extra)


def prompt_conditioning(model, text: str, options) -> dict:
    """One prompt's conditioning (name -> tensor), cached per model."""
    return model.encode_prompt(text, **dict(_settings(options)))


def equal_length(model, prompt: dict, negative: dict, options) -> tuple[dict, dict]:
    """Prompt and negative prompt padded to one length with the empty prompt's chunks (as A1111 does)."""
    import torch

    a, b = prompt["encoder_hidden_states"], negative["encoder_hidden_states"]
    if a.shape[0] == b.shape[0]:
        return prompt, negative
    empty = prompt_conditioning(model, "", options)["encoder_hidden_states"]
    longest = max(a.shape[0], b.shape[0])

    def padded(conditioning: dict) -> dict:
        hidden = conditioning["encoder_hidden_states"]
        extra = [empty] * ((longest - hidden.shape[0]) // empty.shape[0])
        return {**conditioning, "encoder_hidden_states": torch.cat([hidden, *extra])}

    return padded(prompt), padded(negative)


def stack_rows(conditionings: list[dict]) -> dict:
    """Per-prompt conditionings (name -> tensor) as rows (name -> tensor with a batch dimension)."""
    import torch

    return {name: torch.stack([c[name] for c in conditionings]) for name in conditionings[0]}


def clip_skip_of(item) -> int:
    """The Clip skip an item's text conditioner uses (1 when it has none)."""
    return next((use.options.get("clip_skip", 1) for use in item.conditioners if use.name == "text"), 1)


@hookimpl(trylast=True)
def register_conditioners(register):
    """The text conditioner every job uses unless it lists others."""
    register(TextConditioner(), aliases=("prompt",))
