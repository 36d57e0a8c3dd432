"""img2img and inpainting: start from an image instead of pure noise.

As latent diffusion's image-to-image flow (and diffusers' pipelines) do it: encode the
image with the VAE, noise it to the step that ``strength`` picks (1.0 = all steps, as from
noise), then denoise with the item's other conditioning, ControlNets included. Inpainting
also takes a mask (white = repaint): a 9-channel inpainting U-Net sees the mask and the
masked image; any other U-Net keeps the unmasked latents on the image's own trajectory.
After decoding, the original pixels are pasted back outside the (blurred) mask, as A1111
does, so only the masked area changes.

The image's latents are the VAE posterior's mean, so no randomness beyond the item's
seed enters; strength is a batch option (it decides which timesteps the batch runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sdbatch import hookimpl
from sdbatch.api import Conditioner, Extension, noised

from .control import IMAGE_HELP, field_meta as _m, input_file, load_image


@dataclass
class Img2ImgOptions:
    image: str = field(metadata=_m(image=True, help=IMAGE_HELP))
    strength: float = field(default=0.75, metadata=_m(min=0.0, max=1.0, help="denoising strength: "
                                                      "the fraction of the steps run from the noised image"))
    resize: Literal["crop", "fit", "stretch", "none"] = "crop"


class Img2ImgConditioner(Conditioner):
    """Starts each item from its image, noised by the denoising strength."""

    name = "img2img"
    description = "start from an input image (denoising strength)"
    Options = Img2ImgOptions
    batch_options = ("strength",)
    requires = ("img2img",)

    def strength(self, options) -> float:
        return options.strength

    def a1111_fields(self, item, options) -> list:
        """A1111's ``Denoising strength`` (img2img and inpainting both write it)."""
        return [("Denoising strength", f"{options.strength:g}")]

    def condition(self, items, options, model, state):
        images = self.images(items, options)
        return Img2ImgExtension(state, self.clean_latents(model, images))

    def images(self, items, options) -> list:
        """Each item's input image at the item's size."""
        return [load_image(input_file(item, opts.image), item.width, item.height, opts.resize)
                for item, opts in zip(items, options)]

    def clean_latents(self, model, images):
        """The images' VAE latents (the posterior mean: no randomness beyond the item's seed)."""
        import torch

        from sdbatch.inversion import encode_image

        return torch.stack([encode_image(model, image) for image in images]).to(model.device, model.dtype)


class Img2ImgExtension(Extension):
    """x at the first step is the image's latents noised to that step (as diffusers' img2img pipelines)."""

    def __init__(self, state, clean):
        self.state = state
        self.clean = state.model.family.pack(state.model, clean)

    def noised(self, timestep):
        """The clean latents noised to ``timestep`` with each item's own noise."""
        return noised(self.state.scheduler, self.clean, self.state.noise, timestep)

    def start(self, state) -> None:
        state.x = self.noised(state.timesteps[0])


@dataclass
class InpaintOptions(Img2ImgOptions):
    mask: str = field(default="", metadata=_m(image=True, help="white repaints, black keeps (a file or folder "
                                                               "matching image)"))
    strength: float = field(default=1.0, metadata=_m(min=0.0, max=1.0, help="denoising strength in the mask"))
    mask_blur: int = field(default=4, metadata=_m(min=0, max=64, help="Gaussian blur radius of the mask, pixels"))
    invert_mask: bool = False
    overlay: bool = field(default=True, metadata=_m(help="paste the original back outside the mask"))


class InpaintConditioner(Img2ImgConditioner):
    """Repaints the masked area of each item's image."""

    name = "inpaint"
    description = "repaint the masked part of an input image"
    Options = InpaintOptions
    requires = ("inpaint",)

    def a1111_fields(self, item, options) -> list:
        """``Denoising strength`` and A1111's ``Mask blur``."""
        return [*super().a1111_fields(item, options), ("Mask blur", options.mask_blur)]

    def condition(self, items, options, model, state):
        import numpy as np
        import torch
        from PIL import Image, ImageFilter

        originals = self.images(items, options)
        factor = model.vae_scale_factor
        masks, overlays = [], []
        for item, opts, original, mask in zip(items, options, originals, self.mask_images(items, options)):
            if opts.mask_blur:
                mask = mask.filter(ImageFilter.GaussianBlur(opts.mask_blur))
            latent_size = (item.width // factor, item.height // factor)
            small = np.asarray(mask.resize(latent_size, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
            masks.append(torch.from_numpy(small.clip(0, 1))[None])
            overlays.append(_overlay(original, mask) if opts.overlay else None)
        masks = torch.stack(masks).to(model.device, model.dtype)
        return InpaintExtension(state, self.clean_latents(model, originals), masks, overlays)

    def mask_images(self, items, options) -> list:
        """Each item's mask (mode L, white repaints) at the item's size."""
        from PIL import ImageOps

        masks = [load_image(input_file(item, opts.mask), item.width, item.height, opts.resize, mode="L")
                 for item, opts in zip(items, options)]
        return [ImageOps.invert(m) if opts.invert_mask else m for m, opts in zip(masks, options)]

    def check(self, options, job) -> list[str]:
        return [] if options.mask else ["inpaint needs a mask: an image where white is repainted"]


class InpaintExtension(Img2ImgExtension):
    """Inpainting inside the loop: a 9-channel inpainting U-Net gets mask and masked image as
    extra input channels; any other denoiser keeps the unmasked area on the original image's
    trajectory after every step (the blend diffusers uses for plain models)."""

    def __init__(self, state, clean, masks, overlays):
        super().__init__(state, clean)
        self.masks, self.overlays = masks, overlays
        self.extra_channels = None
        unet = state.model.components.get("unet")
        if unet is not None and unet.config.in_channels == 9:
            import torch

            masked = clean * (1 - masks)  # latents of the image with the repaint area blanked
            self.extra_channels = torch.cat([masks, masked], dim=1)

    def model_input(self, step, t, x):
        if self.extra_channels is None:
            return x
        import torch

        extra = self.extra_channels.repeat(len(x) // len(self.extra_channels), 1, 1, 1)
        return torch.cat([x, extra.to(x.dtype)], dim=1)

    def after_step(self, step, t, latents):
        if self.extra_channels is not None:
            return latents
        timesteps = self.state.timesteps
        known = self.clean if step + 1 >= len(timesteps) else self.noised(timesteps[step + 1])
        return (1 - self.masks) * known + self.masks * latents

    def finish(self, row, image):
        overlay = self.overlays[row]
        return overlay(image) if overlay is not None else image


def _overlay(original, mask):
    """Keep the original outside the mask: generated * mask + original * (1 - mask)."""
    from PIL import Image

    def finish(image):
        return Image.composite(image, original, mask)

    return finish


@hookimpl(trylast=True)
def register_conditioners(register):
    """img2img and inpaint."""
    register(Img2ImgConditioner())
    register(InpaintConditioner())
