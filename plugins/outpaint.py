"""Outpainting: extend each item's image by some pixels on chosen sides, then inpaint the new area.

The item's width and height are the final canvas; the input image is fitted into the canvas
less the padding, the padding is filled by repeating the edge pixels (a start the model can
repaint), and the mask covers exactly the new area. The rest is the ``inpaint`` conditioner
(same strength, mask blur and overlay options): only where images and masks come from differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdbatch import hookimpl

from .control import field_meta as _m, input_file, load_image
from .img2img import Img2ImgOptions, InpaintConditioner


def _side(help_text: str):
    return field(default=0, metadata=_m(min=0, max=4096, multiple_of=8, help=help_text))


@dataclass
class OutpaintOptions(Img2ImgOptions):
    left: int = _side("pixels added on the left")
    right: int = _side("pixels added on the right")
    top: int = _side("pixels added at the top")
    bottom: int = _side("pixels added at the bottom")
    strength: float = field(default=1.0, metadata=_m(min=0.0, max=1.0, help="denoising strength in the new area"))
    mask_blur: int = field(default=4, metadata=_m(min=0, max=64, help="Gaussian blur radius of the mask, pixels"))
    invert_mask: bool = False  # the inpaint path reads it; an outpaint mask is never inverted
    overlay: bool = field(default=True, metadata=_m(help="paste the original back outside the new area"))


class OutpaintConditioner(InpaintConditioner):
    """Pads each item's image (edge pixels) and repaints the padding through the inpaint path."""

    name = "outpaint"
    description = "extend an image by pixels on chosen sides and paint the new area (inpainting)"
    Options = OutpaintOptions

    def images(self, items, options) -> list:
        import numpy as np
        from PIL import Image

        padded = []
        for item, opts in zip(items, options):
            inner = _inner(item, opts)
            image = np.asarray(load_image(input_file(item, opts.image), *inner, opts.resize))
            sides = ((opts.top, opts.bottom), (opts.left, opts.right), (0, 0))
            padded.append(Image.fromarray(np.pad(image, sides, mode="edge")))
        return padded

    def mask_images(self, items, options) -> list:
        from PIL import Image

        masks = []
        for item, opts in zip(items, options):
            mask = Image.new("L", (item.width, item.height), 255)
            inner = _inner(item, opts)
            mask.paste(0, (opts.left, opts.top, opts.left + inner[0], opts.top + inner[1]))
            masks.append(mask)
        return masks

    def check(self, options, job) -> list[str]:
        swept = any(f"{self.name}.{side}" in job.spec.sweep for side in ("left", "right", "top", "bottom"))
        if not (options.left or options.right or options.top or options.bottom or swept):
            return ["outpaint needs at least one of left, right, top, bottom"]
        return []


def _inner(item, opts) -> tuple[int, int]:
    """The size the input image takes inside the canvas."""
    width, height = item.width - opts.left - opts.right, item.height - opts.top - opts.bottom
    if width < 8 or height < 8:
        raise ValueError(f"outpaint leaves {width}x{height} of the {item.width}x{item.height} canvas for the image")
    return width, height


@hookimpl(trylast=True)
def register_conditioners(register):
    """The outpaint conditioner."""
    register(OutpaintConditioner())
