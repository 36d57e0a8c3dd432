"""The built-in text conditioner: CLIP hidden states for each item's prompt and negative prompt."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from sdbatch import hookimpl
from sdbatch.api import Conditioner

CACHE_LIMIT = 4096


@dataclass
class TextOptions:
    clip_skip: int = field(default=1, metadata={"min": 1, "max": 12, "help": "1 uses the last layer, 2 the one before (A1111's Clip skip)"})


class TextConditioner(Conditioner):
    """Encodes prompts with the model's tokenizer and text encoder (77 tokens, truncated)."""

    name = "text"
    description = "CLIP text embeddings of prompt and negative prompt"
    Options = TextOptions

    def condition(self, items, options, model, state) -> None:
        import torch

        prompts = [encode_prompt(model, item.prompt, opt.clip_skip) for item, opt in zip(items, options)]
        negatives = [encode_prompt(model, item.negative_prompt, opt.clip_skip) for item, opt in zip(items, options)]
        state.prompt_embeds = torch.stack(prompts)
        state.negative_prompt_embeds = torch.stack(negatives)


def clip_skip_of(item) -> int:
    """The Clip skip an item's text conditioner uses (1 when it has none)."""
    return next((use.options.get("clip_skip", 1) for use in item.conditioners if use.name == "text"), 1)


def encode_prompt(model, text: str, clip_skip: int = 1):
    """Hidden states (tokens, features) for one prompt, cached per model (sweeps repeat prompts)."""
    import torch

    cache = model.extra.setdefault("text_embeddings", {})
    key = (text, clip_skip)
    if key in cache:
        return cache[key]
    if len(cache) >= CACHE_LIMIT:
        cache.clear()
    tokenizer = model.tokenizer
    tokens = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    if len(tokenizer(text, truncation=False).input_ids) > tokenizer.model_max_length:
        print(f"sdbatch: prompt truncated to {tokenizer.model_max_length} tokens: {text[:60]!r}...", file=sys.stderr)
    with torch.inference_mode():
        output = model.text_encoder(tokens.input_ids.to(model.device), output_hidden_states=True)
        if clip_skip > 1:  # A1111's Clip skip: an earlier layer, through the final layer norm
            hidden = model.text_encoder.text_model.final_layer_norm(output.hidden_states[-clip_skip])
        else:
            hidden = output[0]
    cache[key] = hidden[0].to(model.dtype)
    return cache[key]


@hookimpl(trylast=True)
def register_conditioners(register):
    """The text conditioner every job uses unless it lists others."""
    register(TextConditioner(), aliases=("prompt",))
