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
changes nothing unless a batch brings a second prompt), and the conditioner's extension
passes its rows' second prompt and t through ``cross_attention_kwargs`` at every step,
doubled for the renderer's CFG rows [uncond; cond] by ``state.for_guidance``.
"""

from __future__ import annotations

from sdbatch import hookimpl
from sdbatch.api import Conditioner, Extension

from .text import clip_skip_of


class KeyframesConditioner(Conditioner):
    """Interpolation between an animation frame's two keyframes (lerp or slerp per token, or of cross-attention)."""

    name = "keyframes"
    description = "keyframed interpolation of prompt embeddings and initial latents"

    def condition(self, items, options, model, state):
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
                mixes[row] = (model.encode_prompt(end["prompt"], clip_skip=skip)["encoder_hidden_states"],
                              model.encode_prompt(end["negative_prompt"], clip_skip=skip)["encoder_hidden_states"], t)
                self._mix_pooled(model, state, row, animation, skip)
            else:
                self._mix_embeddings(model, state, row, animation, skip)
            mix_noise = MIXERS[animation["noise"]]
            state.latents[row] = mix_noise(start_latents(model, item, start),
                                           start_latents(model, item, end), t)
        return AttentionMix(model, state, mixes) if mixes else None

    @staticmethod
    def _mix_pooled(model, state, row: int, animation: dict, skip) -> None:
        """Under attention interpolation, conditioning other than the text states (SDXL's pooled vector)
        moves linearly with t; the states themselves are mixed in each cross-attention layer."""
        from sdbatch.latents import MIXERS

        start, end, t = animation["from"], animation["to"], animation["t"]
        for rows, key in ((state.prompt, "prompt"), (state.negative, "negative_prompt")):
            names = [name for name in rows if name != "encoder_hidden_states"]
            if names:
                a, b = model.encode_prompt(start[key], clip_skip=skip), model.encode_prompt(end[key], clip_skip=skip)
                for name in names:
                    rows[name][row] = MIXERS["lerp"](a[name], b[name], t)

    @staticmethod
    def _mix_embeddings(model, state, row: int, animation: dict, skip) -> None:
        from sdbatch.latents import MIXERS, slerp_rows

        start, end, t = animation["from"], animation["to"], animation["t"]
        mix_text = slerp_rows if animation["embeddings"] == "slerp" else MIXERS["lerp"]
        for rows, key in ((state.prompt, "prompt"), (state.negative, "negative_prompt")):
            a, b = model.encode_prompt(start[key], clip_skip=skip), model.encode_prompt(end[key], clip_skip=skip)
            for name in rows:  # every conditioning tensor moves: hidden states and pooled embeddings
                rows[name][row] = mix_text(a[name], b[name], t)


class AttentionMix(Extension):
    """Feeds each row's second prompt and t to the wrapped cross-attention at every step (rows without one: t = 0)."""

    def __init__(self, model, state, mixes: dict):
        import torch

        install_mixing_attention(model.unet)
        hidden, negative = state.prompt["encoder_hidden_states"], state.negative["encoder_hidden_states"]
        rows = range(len(state.items))
        self.ends = torch.stack([mixes[row][0] if row in mixes else hidden[row] for row in rows])
        self.negatives = torch.stack([mixes[row][1] if row in mixes else negative[row] for row in rows])
        self.ts = torch.tensor([float(mixes[row][2]) if row in mixes else 0.0 for row in rows], dtype=torch.float32)
        self.state = state

    def denoiser_kwargs(self, step, t, x, cond) -> dict:
        import torch

        other = torch.cat([self.negatives, self.ends]) if self.state.cfg else self.ends
        return {"cross_attention_kwargs": {MixingAttention.KEY: (other, self.state.for_guidance(self.ts))}}


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

    if not start.get("image"):
        return initial_noise(start["seed"], model.family.latent_shape(model, item.width, item.height))
    conditioning = model.encode_prompt(start["prompt"], clip_skip=clip_skip_of(item))
    return invert_image_file(model, start["image"], start["image_sha256"], start["prompt"], conditioning,
                             item.steps, item.width, item.height)


@hookimpl(trylast=True)
def register_conditioners(register):
    """Animation keyframes (added to animation jobs automatically)."""
    register(KeyframesConditioner())
