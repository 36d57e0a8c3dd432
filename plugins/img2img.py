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
from sdbatch.api import Conditioner

from .control import IMAGE_HELP, _m, input_file, load_image


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

    def condition(self, items, options, model, state) -> None:
        self.start_from_images(items, options, model, state)

    def start_from_images(self, items, options, model, state) -> list:
        """Encode each item's image as its starting latents; returns the images (at the item's size)."""
        from sdbatch.inversion import encode_image

        images = [load_image(input_file(item, opts.image), item.width, item.height, opts.resize)
                  for item, opts in zip(items, options)]
        for row, image in enumerate(images):
            state.init_latents[row] = encode_image(model, image)
        state.denoise = options[0].strength
        return images


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

    def condition(self, items, options, model, state) -> None:
        import numpy as np
        import torch
        from PIL import Image, ImageFilter, ImageOps

        originals = self.start_from_images(items, options, model, state)
        factor = model.vae_scale_factor
        for row, (item, opts, original) in enumerate(zip(items, options, originals)):
            mask = load_image(input_file(item, opts.mask), item.width, item.height, opts.resize, mode="L")
            if opts.invert_mask:
                mask = ImageOps.invert(mask)
            if opts.mask_blur:
                mask = mask.filter(ImageFilter.GaussianBlur(opts.mask_blur))
            latent_size = (item.width // factor, item.height // factor)
            small = np.asarray(mask.resize(latent_size, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
            state.inpaint_masks[row] = torch.from_numpy(small.clip(0, 1))[None]
            if opts.overlay:
                state.finishers[row].append(_overlay(original, mask))

    def check(self, options, job) -> list[str]:
        return [] if options.mask else ["inpaint needs a mask: an image where white is repainted"]


def _overlay(original, mask):
    """Keep the original outside the mask: generated * mask + original * (1 - mask)."""
    from PIL import Image

    def finish(image):
        return Image.composite(image, original, mask)

    return finish


@hookimpl
def register_conditioners(register):
    """img2img and inpaint."""
    register(Img2ImgConditioner())
    register(InpaintConditioner())
