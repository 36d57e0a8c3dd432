"""The keyframes conditioner: mixes prompt embeddings and initial latents between keyframes.

It runs after the text conditioner for animation frames. A frame on a keyframe (t = 0)
is left exactly as the text conditioner and the item's seed make it, so it is
bit-identical to that keyframe rendered as a still. Image keyframes are inverted with
DDIM (guidance 1) to the initial latent that reproduces them.
"""

from __future__ import annotations

from sdbatch import hookimpl
from sdbatch.api import Conditioner

from .text import clip_skip_of


class KeyframesConditioner(Conditioner):
    """Interpolation between an animation frame's two keyframes (lerp or slerp per token)."""

    name = "keyframes"
    description = "keyframed interpolation of prompt embeddings and initial latents"

    def condition(self, items, options, model, state) -> None:
        from sdbatch.latents import MIXERS, slerp_rows

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
            mix_text = slerp_rows if animation["embeddings"] == "slerp" else MIXERS["lerp"]
            for rows, key in ((state.prompt, "prompt"), (state.negative, "negative_prompt")):
                a, b = model.encode_prompt(start[key], clip_skip=skip), model.encode_prompt(end[key], clip_skip=skip)
                for name in rows:  # every conditioning tensor moves: hidden states and pooled embeddings
                    rows[name][row] = mix_text(a[name], b[name], t)
            mix_noise = MIXERS[animation["noise"]]
            state.latents[row] = mix_noise(start_latents(model, item, start),
                                           start_latents(model, item, end), t)


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
