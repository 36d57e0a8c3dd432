"""Hires fix: a second pass that upscales each image and denoises it again at the larger size.

As AUTOMATIC1111's hires fix does it: the first pass renders at the item's size; its result is
upscaled, either as latents (the ``latent*`` upscalers: interpolation of the final latents,
A1111's "Latent" modes) or as an image (``lanczos``, ``nearest``: resized, then encoded by the
VAE), noised with the item's own seed and denoised over the last ``denoise`` fraction of a
schedule stretched so that exactly ``steps`` steps run (A1111's ``Hires steps``; 0 means the
item's steps). The second pass keeps the item's prompt, guidance, sampler, LoRAs and
ControlNets (their maps are made again at the larger size); conditioners that set a starting
image (img2img, inpainting) apply to the first pass only. Post-processors run on the final
image. Every option is a sweep axis (``hires.scale: [1.5, 2]``) and is written as A1111 writes
it (``Hires upscale``, ``Hires resize``, ``Hires steps``, ``Hires upscaler``, ``Denoising strength``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from sdbatch import hookimpl
from sdbatch.api import Conditioner, Extension

#: sdbatch's latent upscaler names -> (A1111's name, torch interpolation mode, antialias).
LATENT_UPSCALERS = {
    "latent": ("Latent", "bilinear", False),
    "latent-antialiased": ("Latent (antialiased)", "bilinear", True),
    "latent-bicubic": ("Latent (bicubic)", "bicubic", False),
    "latent-bicubic-antialiased": ("Latent (bicubic antialiased)", "bicubic", True),
    "latent-nearest": ("Latent (nearest)", "nearest", False),
    "latent-nearest-exact": ("Latent (nearest-exact)", "nearest-exact", False),
}
IMAGE_UPSCALERS = {"lanczos": "Lanczos", "nearest": "Nearest"}
#: Every upscaler's name as A1111 writes it in ``Hires upscaler``.
A1111_UPSCALERS = {**{name: spec[0] for name, spec in LATENT_UPSCALERS.items()}, **IMAGE_UPSCALERS}
#: Second-pass sizes are rounded down to this (FLUX.1 and SD3 latents come in 2x2 patches of 8x8 pixels).
SIZE_MULTIPLE = 16


@dataclass
class HiresOptions:
    scale: float = field(default=2.0, metadata={"min": 1.0, "max": 4.0, "help": "upscale factor of the first pass"})
    width: int = field(default=0, metadata={"min": 0, "max": 8192, "help": "second-pass width (0: from scale)"})
    height: int = field(default=0, metadata={"min": 0, "max": 8192, "help": "second-pass height (0: from scale)"})
    steps: int = field(default=0, metadata={"min": 0, "max": 1000, "help": "second-pass steps (0: the item's)"})
    denoise: float = field(default=0.5, metadata={"min": 0.01, "max": 1.0,
                                                  "help": "denoising strength of the second pass"})
    upscaler: Literal["latent", "latent-antialiased", "latent-bicubic", "latent-bicubic-antialiased",
                      "latent-nearest", "latent-nearest-exact", "lanczos", "nearest"] = "latent"


def target_size(width: int, height: int, options) -> tuple[int, int]:
    """The second pass's (width, height): given, or the first pass's times ``scale``; multiples of 16."""
    target_w = options.width or int(width * options.scale)
    target_h = options.height or int(height * options.scale)
    if options.width and not options.height:
        target_h = int(height * options.width / width)
    if options.height and not options.width:
        target_w = int(width * options.height / height)
    return max(SIZE_MULTIPLE, target_w // SIZE_MULTIPLE * SIZE_MULTIPLE), \
        max(SIZE_MULTIPLE, target_h // SIZE_MULTIPLE * SIZE_MULTIPLE)


def schedule(steps: int, denoise: float) -> tuple[int, float]:
    """(schedule length, strength) that run exactly ``steps`` denoising steps at ``denoise``.

    A1111 stretches the schedule to ``int(steps / denoise)`` and runs its last ``steps``; the
    strength given to the renderer is half a step over ``steps / total`` so that rounding
    down keeps exactly ``steps``."""
    total = max(steps, int(steps / min(denoise, 0.999)))
    return total, min(1.0, (steps + 0.5) / total)


class HiresConditioner(Conditioner):
    """A hires fix: upscale, then a second denoising pass at the larger size."""

    name = "hires"
    description = "hires fix: upscale the first pass and denoise it again at the larger size (A1111)"
    Options = HiresOptions
    # one second-pass size and schedule per batch
    batch_options = ("scale", "width", "height", "steps", "denoise", "upscaler")

    def check(self, options, job) -> list[str]:
        """An edit moves x_t of the first pass's size at a step: it has no second pass to move."""
        if getattr(job.spec, "edit", None) is not None:
            return ["the hires fix does not apply to edit jobs (their latent edits are made for the first "
                    "pass's size); upscale edited images with postprocess: resize instead"]
        return []

    def a1111_fields(self, item, options) -> list:
        """A1111's hires fields: ``Hires upscale`` or ``Hires resize``, ``Hires steps``, ``Hires upscaler``."""
        fields = [("Denoising strength", f"{options.denoise:g}")]
        if options.width or options.height:
            width, height = target_size(item.width, item.height, options)
            fields.append(("Hires resize", f"{width}x{height}"))
        else:
            fields.append(("Hires upscale", f"{options.scale:g}"))
        if options.steps:
            fields.append(("Hires steps", options.steps))
        fields.append(("Hires upscaler", A1111_UPSCALERS[options.upscaler]))
        return fields

    def condition(self, items, options, model, state):
        return HiresExtension(state, options[0])


class HiresExtension(Extension):
    """Runs the second pass on the whole batch once the first is decoded (``finish_batch``)."""

    def __init__(self, state, options):
        self.state, self.options = state, options

    def finish_batch(self, images: list, latents) -> list:
        state, options, model = self.state, self.options, self.state.model
        first = state.items[0]
        width, height = target_size(first.width, first.height, options)
        steps, strength = schedule(options.steps or first.steps, options.denoise)
        items = [self.second_pass_item(item, width, height, steps) for item in state.items[: len(images)]]
        clean = self.upscaled(images, latents, width, height)
        return [result.image for result in state.renderer.refine(items, clean, strength)]

    def second_pass_item(self, item, width: int, height: int, steps: int):
        """The item at the larger size: no hires (no third pass), no starting image, no post-processing yet."""
        keep = tuple(use for use in item.conditioners if use.name != "hires" and not self.sets_start(use))
        return replace(item, width=width, height=height, steps=steps, conditioners=keep, postprocess=())

    def sets_start(self, use) -> bool:
        """True for conditioners that start from an image of their own (they have a strength)."""
        conditioner = self.state.registry.require("conditioner", use.name).obj
        return conditioner.strength(conditioner.parse_options(use.options)) is not None

    def upscaled(self, images: list, latents, width: int, height: int):
        """Clean latents (rows, unpacked) at the second pass's size, from the latents or the images."""
        import torch

        from sdbatch.inversion import encode_image

        model, first = self.state.model, self.state.items[0]
        _, latent_h, latent_w = model.family.latent_shape(model, width, height)
        if self.options.upscaler in LATENT_UPSCALERS:
            _, mode, antialias = LATENT_UPSCALERS[self.options.upscaler]
            small = model.family.unpack(model, latents, first.width, first.height).float()
            rows = [torch.nn.functional.interpolate(row[None], size=(latent_h, latent_w), mode=mode,
                                                    antialias=antialias)[0] for row in small]
            return torch.stack(rows)
        from PIL import Image

        resample = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}[self.options.upscaler]
        return torch.stack([encode_image(model, image.convert("RGB").resize((width, height), resample))
                            for image in images])


@hookimpl(trylast=True)
def register_conditioners(register):
    """The hires fix (``hires:`` in a job, or ``- hires: {...}`` under conditioners)."""
    register(HiresConditioner())
