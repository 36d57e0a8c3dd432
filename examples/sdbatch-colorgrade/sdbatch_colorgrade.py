"""sdbatch-colorgrade: colour grading for every image, and a CSV catalogue of the run.

A complete third-party sdbatch plugin in one module. ``pyproject.toml`` names this module
in the ``sdbatch`` entry-point group; sdbatch imports it and calls the two hooks below.

    postprocess:
      - colorgrade: {saturation: 0.8, temperature: 0.2, gamma: 1.1}
    outputs:
      - png
      - catalogue: {path: "{job}-catalogue.csv"}
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from sdbatch import hookimpl
from sdbatch.api import PostProcessor, Writer
from sdbatch.output import check_template


# ---------------------------------------------------------------- the post-processor
@dataclass
class GradeOptions:
    """Each field is checked by sdbatch at validation (type, min, max) and can be a sweep axis."""

    brightness: float = field(default=1.0, metadata={"min": 0.0, "max": 4.0, "help": "1 keeps, 0 is black"})
    contrast: float = field(default=1.0, metadata={"min": 0.0, "max": 4.0, "help": "1 keeps, 0 is flat grey"})
    saturation: float = field(default=1.0, metadata={"min": 0.0, "max": 4.0, "help": "1 keeps, 0 is greyscale"})
    temperature: float = field(default=0.0, metadata={"min": -1.0, "max": 1.0, "help": "> 0 warmer, < 0 cooler"})
    gamma: float = field(default=1.0, metadata={"min": 0.1, "max": 10.0, "help": "> 1 brightens mid-tones"})


class ColorGrade(PostProcessor):
    """Temperature, gamma, brightness, contrast, then saturation: the order a colourist works in."""

    name = "colorgrade"
    description = "brightness, contrast, saturation, temperature and gamma"
    Options = GradeOptions

    def apply(self, image, options, item):
        from PIL import ImageEnhance

        image = image.convert("RGB")
        if options.temperature or options.gamma != 1.0:
            image = _white_balance_and_gamma(image, options.temperature, options.gamma)
        for enhancer, factor in ((ImageEnhance.Brightness, options.brightness),
                                 (ImageEnhance.Contrast, options.contrast),
                                 (ImageEnhance.Color, options.saturation)):
            if factor != 1.0:
                image = enhancer(image).enhance(factor)
        return image


def _white_balance_and_gamma(image, temperature: float, gamma: float):
    """Scale red up and blue down (warmer) or the reverse, then apply ``out = in ** (1 / gamma)``."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = pixels * np.array([1 + 0.25 * temperature, 1.0, 1 - 0.25 * temperature], dtype=np.float32)
    pixels = np.clip(pixels, 0.0, 1.0) ** (1.0 / gamma)
    return Image.fromarray((pixels * 255.0).round().astype(np.uint8))


# ---------------------------------------------------------------- the writer
#: The catalogue's columns, in order.
COLUMNS = ("id", "file", "prompt", "negative", "seed", "steps", "guidance", "sampler", "size", "sha256")


@dataclass
class CatalogueOptions:
    path: str = field(default="catalogue.csv", metadata={"help": "run-level file; field: {job}"})


class Catalogue(Writer):
    """One CSV row per finished image, rewritten at the end of every run (resumed items included)."""

    name = "catalogue"
    description = "CSV catalogue of the run: id, file, prompt, seed, ..., sha256"
    Options = CatalogueOptions

    @classmethod
    def check(cls, options, job) -> list[str]:
        return check_template(options.path, fields={"job"})

    def finish(self, entries) -> list[str]:
        relpath = self.options.path.format(job=self.context.job_name)
        data = catalogue_csv(sorted(entries, key=lambda entry: entry.index))
        return [self.context.out.write_run_file(relpath, data, self.name).path]


def catalogue_csv(entries) -> bytes:
    """The CSV text (UTF-8, header first) for manifest entries."""
    buffer = io.StringIO()
    rows = csv.writer(buffer, lineterminator="\n")
    rows.writerow(COLUMNS)
    for entry in entries:
        rows.writerow(_row(entry))
    return buffer.getvalue().encode("utf-8")


def _row(entry) -> list:
    item = entry.item
    path = entry.image_path()
    digest = next((f["sha256"] for f in entry.files if f["path"] == path), "")
    return [entry.id, path or "", item.get("prompt", ""), item.get("negative_prompt", ""), item.get("seed"),
            item.get("steps"), item.get("guidance"), item.get("sampler"),
            f"{item.get('width')}x{item.get('height')}", digest]


# ---------------------------------------------------------------- the hooks
@hookimpl
def register_postprocessors(register):
    """The colour grade."""
    register(ColorGrade())


@hookimpl
def register_writers(register):
    """The CSV catalogue."""
    register(Catalogue, aliases=("csv",))
