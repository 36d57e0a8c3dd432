"""Input images named in plugin options: one file, a folder, or one image per animation frame.

A conditioner option marked ``image=True`` in its field metadata names an input. During
validation a folder becomes a plan axis (one item per image, sorted by name) or, in an
animation, a per-frame sequence (frame n takes the folder's n-th image). The plan records
each item's input files with their sha256 in ``extra["inputs"]``, so an item's id changes
when an input's content does. No image is decoded here; planning stays cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
from functools import lru_cache
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def image_option_names(options_class) -> tuple[str, ...]:
    """Names of an Options dataclass's fields that name input images."""
    if not dataclasses.is_dataclass(options_class):
        return ()
    return tuple(f.name for f in dataclasses.fields(options_class) if f.metadata.get("image"))


def image_files(folder: str | Path) -> list[str]:
    """The images in a folder (not recursive), sorted by name: the order items and frames take."""
    return sorted(str(p) for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def frame_file(path: str, frame: int | None) -> str:
    """The file an option value means for an item: itself, or a folder's image for this frame."""
    if frame is None or not Path(path).is_dir():
        return path
    files = image_files(path)
    if frame >= len(files):
        raise ValueError(f"{path} has {len(files)} images; frame {frame} needs one more than that")
    return files[frame]


@lru_cache(maxsize=4096)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """Content hash of a file, memoised while the file's size and mtime stay the same."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


class InputFiles:
    """Finds the input images of an item's plugin uses and hashes them (for the plan)."""

    def __init__(self, fields: dict[str, tuple[str, ...]]):
        self.fields = fields  # plugin name -> its image option names

    def __bool__(self) -> bool:
        return any(self.fields.values())

    def of(self, uses, frame: int | None = None) -> dict[str, str]:
        """{file: sha256} of every input image the uses name, for this frame."""
        found = {}
        for use in uses:
            for name in self.fields.get(use.name, ()):
                value = use.options.get(name)
                if value:
                    path = frame_file(value, frame)
                    found[path] = file_sha256(path)
        return found
