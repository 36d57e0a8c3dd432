"""Built-in post-processors: Lanczos resize and an invisible watermark."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sdbatch import hookimpl
from sdbatch.api import PostProcessor


@dataclass
class ResizeOptions:
    scale: float | None = field(default=None, metadata={"min": 0.01, "max": 16.0, "help": "factor, e.g. 2"})
    width: int | None = field(default=None, metadata={"min": 1, "max": 16384})
    height: int | None = field(default=None, metadata={"min": 1, "max": 16384})


class Resize(PostProcessor):
    """Resize with Lanczos: by ``scale``, or to ``width``/``height`` (one keeps the aspect ratio)."""

    name = "resize"
    description = "Lanczos resize by scale or to a size"
    Options = ResizeOptions

    def a1111_fields(self, item, options) -> list:
        """A1111's Extras upscale fields (a resize after generation, not a hires-fix pass)."""
        if options.scale is not None:
            return [("Postprocess upscale by", f"{options.scale:g}"), ("Postprocess upscaler", "Lanczos")]
        size = self.size(item.width, item.height, options)
        return [("Postprocess upscale to", f"{size[0]}x{size[1]}"), ("Postprocess upscaler", "Lanczos")] if size else []

    def size(self, width: int, height: int, options) -> tuple | None:
        """The output size for an image of this size, or None to keep it."""
        if options.scale is not None:
            return round(width * options.scale), round(height * options.scale)
        if options.width and options.height:
            return options.width, options.height
        if options.width:
            return options.width, round(height * options.width / width)
        if options.height:
            return round(width * options.height / height), options.height
        return None

    def apply(self, image, options, item):
        from PIL import Image

        size = self.size(*image.size, options)
        return image.resize(size, Image.Resampling.LANCZOS) if size else image


@dataclass
class WatermarkOptions:
    text: str = field(default="sdbatch", metadata={"help": "the message embedded (ASCII)"})
    # dwtDctSvd reads back reliably; plain dwtDct (Stability's choice) often fails on smooth images.
    method: Literal["dwtDct", "dwtDctSvd"] = "dwtDctSvd"


class Watermark(PostProcessor):
    """An invisible watermark (the invisible-watermark library, as Stability's scripts use).

    It needs images of at least 256x256: put a resize before it for smaller outputs.
    """

    name = "watermark"
    description = "invisible watermark (imwatermark), readable with 'decode_watermark'"
    Options = WatermarkOptions

    def apply(self, image, options, item):
        import numpy as np
        from imwatermark import WatermarkEncoder
        from PIL import Image

        if min(image.size) < 256:
            raise ValueError(f"watermark needs an image of at least 256x256, got {image.size[0]}x{image.size[1]}; "
                             "add a resize before it")
        encoder = WatermarkEncoder()
        encoder.set_watermark("bytes", options.text.encode())
        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
        marked = encoder.encode(np.ascontiguousarray(bgr), options.method)
        return Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1]))


def decode_watermark(image, length: int, method: str = "dwtDctSvd") -> bytes:
    """Read back a watermark of ``length`` bytes from a PIL image."""
    import numpy as np
    from imwatermark import WatermarkDecoder

    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return WatermarkDecoder("bytes", length * 8).decode(bgr, method)


@hookimpl(trylast=True)
def register_postprocessors(register):
    """Resize and watermark."""
    register(Resize())
    register(Watermark())
