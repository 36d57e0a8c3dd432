"""The keyframes conditioner: mixes prompt embeddings and initial latents between keyframes.

It runs after the text conditioner for animation frames. A frame on a keyframe (t = 0)
is left exactly as the text conditioner and the item's seed make it, so it is
bit-identical to that keyframe rendered as a still. Image keyframes are inverted with
DDIM (guidance 1) to the initial latent that reproduces them.

``embeddings: attention`` interpolates cross-attention instead of the text embeddings,
as AID's outer interpolation (He et al., 2024): each cross-attention layer attends to
both prompts and mixes the outputs, (1 - t) Attn(Q, K_A, V_A) + t Attn(Q, K_B, V_B).
(AID's inner interpolation of K and V is, with SD's linear bias-free K/V projections,
exactly ``embeddings: lerp``, so it is not a mode of its own.) The hook is narrow: the
U-Net's attention processors are wrapped once (a wrapper calls the original and
changes nothing unless a batch brings a second prompt), and each batch passes its rows'
second prompt and t through ``cross_attention_kwargs`` in ``state.unet_kwargs``,
doubled as the renderer's CFG batch [uncond; cond] when any row uses guidance.
"""

from __future__ import annotations

from sdbatch import hookimpl
from sdbatch.api import Conditioner

from .text import clip_skip_of, encode_prompt


class KeyframesConditioner(Conditioner):
    """Interpolation between an animation frame's two keyframes (lerp or slerp per token, or of cross-attention)."""

    name = "keyframes"
    description = "keyframed interpolation of prompt embeddings and initial latents"

    def condition(self, items, options, model, state) -> None:
        from sdbatch.latents import MIXERS

        mixes = {}  # row -> (end prompt's embeddings, end negative's, t) for attention interpolation
        for row, item in enumerate(items):
            animation = item.extra.get("animation")
            if animation is None:
                continue
            start, t = animation["from"], animation["t"]
            if t == 0:
                if start.get("image"):
                    state.latents[row] = start_latents(model, item, start)
                continue
            end = animation["to"]
            skip = clip_skip_of(item)
            if animation["embeddings"] == "attention":
                state.prompt_embeds[row] = encode_prompt(model, start["prompt"], skip)
                state.negative_prompt_embeds[row] = encode_prompt(model, start["negative_prompt"], skip)
                mixes[row] = (encode_prompt(model, end["prompt"], skip),
                              encode_prompt(model, end["negative_prompt"], skip), t)
            else:
                self._mix_embeddings(model, state, row, animation, skip)
            mix_noise = MIXERS[animation["noise"]]
            state.latents[row] = mix_noise(start_latents(model, item, start),
                                           start_latents(model, item, end), t)
        if mixes:
            attend_to_both(model, items, state, mixes)

    @staticmethod
    def _mix_embeddings(model, state, row: int, animation: dict, skip) -> None:
        from sdbatch.latents import MIXERS, slerp_rows

        start, end, t = animation["from"], animation["to"], animation["t"]
        mix_text = slerp_rows if animation["embeddings"] == "slerp" else MIXERS["lerp"]
        state.prompt_embeds[row] = mix_text(encode_prompt(model, start["prompt"], skip),
                                            encode_prompt(model, end["prompt"], skip), t)
        state.negative_prompt_embeds[row] = mix_text(encode_prompt(model, start["negative_prompt"], skip),
                                                     encode_prompt(model, end["negative_prompt"], skip), t)


def attend_to_both(model, items, state, mixes: dict) -> None:
    """Give the batch's cross-attention each row's second prompt and t (rows without one: t = 0)."""
    import torch

    install_mixing_attention(model.unet)
    rows = range(len(items))
    ends = [mixes[row][0] if row in mixes else state.prompt_embeds[row] for row in rows]
    negatives = [mixes[row][1] if row in mixes else state.negative_prompt_embeds[row] for row in rows]
    ts = [float(mixes[row][2]) if row in mixes else 0.0 for row in rows]
    if any(item.guidance > 1.0 for item in items):  # the renderer's rule: CFG doubles the batch as [uncond; cond]
        other, ts = torch.stack(negatives + ends), ts + ts
    else:
        other = torch.stack(ends)
    kwargs = state.unet_kwargs.setdefault("cross_attention_kwargs", {})
    kwargs[MixingAttention.KEY] = (other, torch.tensor(ts, dtype=torch.float32))


class MixingAttention:
    """A U-Net attention processor wrapped: unchanged, unless the batch brings a second prompt to mix in."""

    KEY = "sdbatch_attention_mix"

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 sdbatch_attention_mix=None):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if sdbatch_attention_mix is None or encoder_hidden_states is None or not attn.is_cross_attention:
            return out
        other, t = sdbatch_attention_mix
        other_out = self.original(attn, hidden_states, other.to(encoder_hidden_states), attention_mask, temb)
        weight = t.to(out).view(-1, *[1] * (out.dim() - 1))
        return out + (other_out - out) * weight  # rows at t = 0 keep their output exactly


def install_mixing_attention(unet) -> None:
    """Wrap every attention processor of the U-Net once (idempotent); the wrappers pass calls through."""
    processors = getattr(unet, "attn_processors", None)
    if processors is None:
        raise ValueError("embeddings: attention needs a U-Net whose attention processors can be swapped")
    if not all(isinstance(p, MixingAttention) for p in processors.values()):
        unet.set_attn_processor({name: p if isinstance(p, MixingAttention) else MixingAttention(p)
                                 for name, p in processors.items()})


def start_latents(model, item, start: dict):
    """x_T of a start point (a keyframe or an edit source): its seed's noise, or its image DDIM-inverted."""
    from sdbatch.inversion import invert_image_file
    from sdbatch.latents import initial_noise

    factor = model.vae_scale_factor
    if not start.get("image"):
        return initial_noise(start["seed"], (model.latent_channels, item.height // factor, item.width // factor))
    embeds = encode_prompt(model, start["prompt"], clip_skip_of(item))
    return invert_image_file(model, start["image"], start["image_sha256"], start["prompt"], embeds,
                             item.steps, item.width, item.height)


@hookimpl(trylast=True)
def register_conditioners(register):
    """Animation keyframes (added to animation jobs automatically)."""
    register(KeyframesConditioner())
