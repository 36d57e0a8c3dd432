"""Image file writers: PNG, JPEG and WebP, each carrying A1111 parameters and sdbatch's record."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sdbatch import hookimpl
from sdbatch.api import Writer
from sdbatch.metadata import a1111_fields, encode_user_comment, format_parameters, record_xmp
from sdbatch.output import check_template, render_template, spooled

DEFAULT_PATH = "{prompt_slug}/{seed}{axes}-{id}.{ext}"  # {axes}: the other sweep axes' values, if any


def parameters_text(result, context) -> str:
    item = result.item
    fields = a1111_fields(item, result.model_hash, context.versions.get("sdbatch", ""),
                          getattr(context.job, "plugins", None))
    added = (getattr(result, "outputs", None) or {}).get("a1111") or {}
    if added:  # fields conditioners attached per row (Lora hashes, TI hashes ...), before sdbatch's own
        ours = {k: fields.pop(k) for k in ("sdbatch id", "Version") if k in fields}
        fields = {**fields, **added, **ours}
    return format_parameters(item.prompt, item.negative_prompt, fields)


def record_json(result, context) -> str:
    """The full item record stored beside the A1111 text: enough to re-render the image."""
    record = {**result.item.to_json(), "model_hash": result.model_hash, "versions": context.versions}
    return json.dumps(record, ensure_ascii=False, sort_keys=True)


class ImageWriter(Writer):
    """Shared logic: path template, metadata, atomic write."""

    writes_images = True
    parallel = True  # each item's file depends on that item alone
    ext = "png"

    @classmethod
    def check(cls, options, job) -> list[str]:
        return check_template(options.path)

    def write(self, result) -> list:
        context = self.context
        relpath = render_template(self.options.path, result.item, self.ext, context.job_name)
        data = spooled(lambda file: self.encode(result, file))  # encoded with the GIL released
        record = context.out.write_bytes(relpath, data, result.item.id, self.name)
        return [{**record.to_json(), "image": True}]

    def encode(self, result, buffer) -> None:
        raise NotImplementedError


@dataclass
class PngOptions:
    path: str = field(default=DEFAULT_PATH, metadata={"help": "output path template"})
    compress_level: int = field(default=4, metadata={"min": 0, "max": 9})
    metadata: bool = True


class PngWriter(ImageWriter):
    """PNG with A1111's ``parameters`` text chunk and an ``sdbatch`` JSON chunk."""

    name = "png"
    description = "PNG files with A1111 parameters and the full item record"
    Options = PngOptions
    ext = "png"

    def encode(self, result, buffer) -> None:
        from PIL.PngImagePlugin import PngInfo

        info = None
        if self.options.metadata:
            info = PngInfo()
            info.add_text("parameters", parameters_text(result, self.context))
            info.add_text("sdbatch", record_json(result, self.context))
        result.image.save(buffer, "PNG", pnginfo=info, compress_level=self.options.compress_level)


@dataclass
class LossyOptions:
    path: str = field(default=DEFAULT_PATH, metadata={"help": "output path template"})
    quality: int = field(default=92, metadata={"min": 1, "max": 100})
    metadata: bool = True


class JpegWriter(ImageWriter):
    """JPEG with the A1111 text in EXIF UserComment, as A1111 stores it, and the full record in XMP."""

    name = "jpeg"
    description = "JPEG files with A1111 parameters in EXIF UserComment, the full record in XMP"
    Options = LossyOptions
    ext = "jpg"
    format = "JPEG"

    def encode(self, result, buffer) -> None:
        kwargs = {"quality": self.options.quality}
        if self.options.metadata:
            from PIL import Image

            exif = Image.Exif()
            exif.get_ifd(0x8769)[0x9286] = encode_user_comment(parameters_text(result, self.context))
            kwargs["exif"] = exif.tobytes()
            kwargs["xmp"] = record_xmp(record_json(result, self.context))
        result.image.save(buffer, self.format, **kwargs)


class WebpWriter(JpegWriter):
    name = "webp"
    description = "WebP files with A1111 parameters in EXIF UserComment, the full record in XMP"
    ext = "webp"
    format = "WEBP"


@hookimpl(trylast=True)
def register_writers(register):
    """Image files, one per item."""
    register(PngWriter)
    register(JpegWriter, aliases=("jpg",))
    register(WebpWriter)
