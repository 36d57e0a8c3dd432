"""Input images named in plugin options: one file, a folder, or one image per animation frame.

A conditioner option marked ``image=True`` in its field metadata names an input. During
validation a folder becomes a plan axis (one item per image, sorted by name) or, in an
animation, a per-frame sequence (frame n takes the folder's n-th image). The plan records
each item's input files with their sha256 in ``extra["inputs"]``, so an item's id changes
when an input's content does. No image is decoded here; planning stays cheap.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
import stat
from functools import lru_cache
from pathlib import Path

#: A Hugging Face hub model id (organisation/name), as a model, ControlNet or tiny VAE may be named.
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


#: An input larger than this is refused at validation (a mistake or an attack, never a photo).
MAX_INPUT_BYTES = 2 << 30


def input_problem(path: Path, kind: str = "file") -> str | None:
    """Why ``path`` cannot be an input of ``kind`` (file, folder, or image: a file or a folder); None if it can.

    Only regular files of bounded size pass: /dev/zero, a FIFO or a socket would never end.
    """
    what = {"image": "image file or folder"}.get(kind, kind)
    try:
        info = path.stat()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return f"{what} not found"
        return f"cannot use this {what} ({exc.strerror or exc})"
    except ValueError:  # an embedded NUL
        return f"{what} not found"
    if stat.S_ISDIR(info.st_mode):
        return None if kind in ("folder", "image") else "a folder, where a file is expected"
    if kind == "folder":
        return "a file, where a folder is expected"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a device, FIFO or socket would never end)"
    if info.st_size == 0:  # also what /proc files report, whose reading never ends or fails
        return "an empty file"
    if info.st_size > MAX_INPUT_BYTES:
        return f"{info.st_size:,} bytes; an input may have at most {MAX_INPUT_BYTES:,}"
    return None


def folder_problem(folder: Path, limit: int = 10_000) -> str | None:
    """A folder whose files are read (wildcards): any FIFO, device or oversized file in it is refused."""
    seen = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            seen += 1
            if seen > limit:
                return f"{folder} holds more than {limit:,} files"
            problem = input_problem(Path(root) / name)
            if problem and problem != "an empty file":
                return f"{Path(root, name)}: {problem}"
    return None


def safetensors_problem(path: Path, any_name: bool = False) -> str | None:
    """What a ``.safetensors`` file (any file with ``any_name``) really is when it is not one; reads 9 bytes."""
    if (path.suffix.lower() != ".safetensors" and not any_name) or not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        kind = "a PyTorch zip archive" if head.startswith(b"PK") else "a pickle"
        return (f"{path.name} is {kind}, not safetensors; pickles can run code when loaded. "
                "Convert it to safetensors, or rename it .ckpt and set allow_pickle: true if you trust it")
    length = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if len(head) < 9 or head[8:9] != b"{" or 8 + length > size:
        return f"{path.name} is not a safetensors file (no valid header)"
    return None


AUDIO_SIGNATURES = ((b"ID3", 0), (b"\xff\xfb", 0), (b"\xff\xf3", 0), (b"\xff\xf2", 0), (b"\xff\xf1", 0),
                    (b"\xff\xf9", 0), (b"RIFF", 0), (b"OggS", 0), (b"fLaC", 0), (b"ftyp", 4),
                    (b"\x1a\x45\xdf\xa3", 0), (b"FORM", 0))


IMAGE_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", 0), (b"\xff\xd8\xff", 0), (b"GIF8", 0), (b"BM", 0), (b"WEBP", 8),
                    (b"II*\x00", 0), (b"MM\x00*", 0))


def format_problem(path: Path, kind: str) -> str | None:
    """Whether a regular file starts like its ``kind`` (image, audio or safetensors); reads 16 bytes."""
    if kind == "safetensors":
        return safetensors_problem(path, any_name=True)
    with open(path, "rb") as handle:
        head = handle.read(16)
    signatures = {"image": IMAGE_SIGNATURES, "audio": AUDIO_SIGNATURES}[kind]
    if not any(head[at:at + len(sig)] == sig for sig, at in signatures):
        shown = {"image": "PNG, JPEG, WebP, BMP, TIFF or GIF", "audio": "mp3, wav, ogg, flac, m4a, webm"}[kind]
        return f"{path.name} is not an {kind} file ({shown})"
    return None


def audio_problem(path: str) -> str | None:
    """None for a file that starts like audio (mp3, wav, ogg, flac, m4a/mp4, webm/mkv, aiff)."""
    problem = input_problem(Path(path))
    if problem:
        return f"audio {problem}: {path}"
    return format_problem(Path(path), "audio")


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
