"""The output folder: atomic file writes, path templates, and the manifest that makes runs resumable.

An item counts as finished only when its manifest line exists, and that line is appended
only after every file of the item was written to a temporary name, renamed and synced.
A run killed at any moment therefore leaves finished items, at most some temporary
files (removed on the next start), and never a partial file under a final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OutputConflict, shorten

MANIFEST = "manifest.jsonl"
RUN_FILES = "run_files.json"  # files made from the whole run (grids, videos): rebuilt on every run
TEMP_MARK = ".sdbatch-tmp"

#: Fields a path template may use.
TEMPLATE_FIELDS = {
    "id", "index", "seed", "prompt_slug", "template_slug", "steps", "guidance", "sampler",
    "width", "height", "model", "ext", "job", "frame", "axes",
}


def check_template(template: str, fields: set = TEMPLATE_FIELDS) -> list[str]:
    """Problems with an output path template (unknown fields, escaping the output folder)."""
    problems = []
    if len(template) > MAX_TEMPLATE_CHARS or re.search(r"[:!][^{}]*\d{4,}", template):
        return [f"path template {shorten(template)!r} is too long or pads a field to thousands of characters"]
    try:
        names = {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as exc:
        return [f"bad path template {shorten(template)!r}: {exc}"]
    unknown = names - fields
    if unknown:
        from .errors import did_you_mean

        first = sorted(unknown)[0]
        problems.append(f"unknown field '{{{first}}}' in path template{did_you_mean(first, fields)}; "
                        f"fields: {', '.join(sorted(fields))}")
    if _escapes(template.replace("{", "").replace("}", "")):
        problems.append(f"path template {shorten(template)!r} escapes the output folder (absolute or '..')")
    if not unknown:
        sample = {name: _SAMPLE_VALUES.get(name, "x") for name in fields}
        try:
            rendered = template.format_map(sample)
        except (ValueError, KeyError, IndexError, AttributeError, OverflowError, MemoryError) as exc:
            problems.append(f"bad path template {shorten(template)!r}: {shorten(str(exc))}")
        else:  # a format spec can cut a field away, {id:.0}../x, or pad it with '/'
            if not problems and _escapes(rendered):
                problems.append(f"path template {shorten(template)!r} gives {shorten(rendered)!r}, outside the "
                                "output folder")
    return problems


MAX_TEMPLATE_CHARS = 1000

#: Typed stand-ins for template fields, so format specs such as {index:06d} are checked.
_SAMPLE_VALUES = {"index": 0, "seed": 0, "steps": 20, "width": 512, "height": 512, "frame": 0}


def _escapes(relpath: str) -> bool:
    path = Path(relpath)
    return path.is_absolute() or relpath.startswith(("/", "\\")) or ".." in path.parts or "\0" in relpath


def check_name(name: str) -> str | None:
    """Why a job name cannot name files (it fills {job} in output paths); None if it can."""
    if not name or len(name) > 100 or name in (".", "..") or re.search(r"[/\\\x00-\x1f]", name):
        return (f"a job name is one file name of at most 100 characters, without '/', '\\' or control "
                f"characters, got {shorten(repr(name))}")
    return None


def inside(root: Path, target: Path) -> Path:
    """``target`` if its folder, symbolic links resolved, lies in ``root``; else OutputConflict.

    A link planted in the output folder (shared storage, where datasets live) must not make
    a file land elsewhere, so the folder is resolved at every write, not only at the start.
    """
    real_root = os.path.realpath(root)
    real = os.path.realpath(target.parent)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise OutputConflict(f"{target.parent} leads to {real}, outside the output folder {root} (a symbolic "
                             "link?); sdbatch writes only inside it: remove the link")
    return target


def open_append(path: Path):
    """Open a log such as manifest.jsonl for appending, refusing a symbolic link (it would append elsewhere)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise OutputConflict(f"{path} is a symbolic link; sdbatch appends only to its own file there: "
                                 "remove the link") from None
        raise
    return os.fdopen(fd, "ab")


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(value)).strip("._") or "_"


def template_values(item, ext: str, job_name: str = "job") -> dict:
    from .plan import slug

    return {
        "id": item.id, "index": item.index, "seed": item.seed, "prompt_slug": slug(item.prompt),
        "template_slug": slug(item.template or item.prompt), "steps": item.steps,
        "guidance": f"{item.guidance:g}", "sampler": _slug(item.sampler), "width": item.width,
        "height": item.height, "model": _slug(Path(item.model).stem or item.model), "ext": ext,
        "job": _slug(job_name), "frame": item.extra.get("animation", {}).get("frame", item.index),
        "axes": axes_slug(item),
    }


#: Axes the default image path shows by themselves ({prompt_slug}, {seed}; an edit's source is both).
_NAMED_AXES = ("prompt", "seed", "source")


def axes_slug(item, limit: int = 24) -> str:
    """``_name=value`` for each sweep axis of the item beyond prompt and seed, values cut between
    words: items that differ only there (an edit's strengths and directions) get distinct names."""
    parts = []
    for name, value in item.axes.items():
        if name in _NAMED_AXES:
            continue
        text = _slug(value)
        if len(text) > limit:
            text = (text[:limit].rsplit("_", 1)[0] if "_" in text[:limit] else text[:limit]).rstrip("_-.")
        parts.append(f"_{_slug(name)}={text}")
    return "".join(parts)


def render_template(template: str, item, ext: str, job_name: str = "job") -> str:
    """The relative output path for an item; refuses any result outside the folder."""
    relpath = template.format_map(template_values(item, ext, job_name))
    if _escapes(relpath):
        raise OutputConflict(f"output path {shorten(relpath)!r} escapes the output folder")
    return relpath


@dataclass
class FileRecord:
    path: str  # relative to the output folder
    sha256: str
    writer: str

    def to_json(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "writer": self.writer}


@dataclass
class Entry:
    """A finished item as the manifest records it."""

    id: str
    index: int
    files: list
    item: dict
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    writers: list = field(default_factory=list)  # every writer that has stored this item

    def image_path(self) -> str | None:
        return next((f["path"] for f in self.files if f.get("image")), None) or (
            self.files[0]["path"] if self.files else None
        )


class OutputDir:
    """An output folder with its manifest; its writes and manifest appends are safe from several threads.

    The driver's instance owns the folder: it holds the folder's lock, clears temporaries
    left by a killed run and indexes the manifest. A worker's (``worker=True``, on a Ray
    worker that writes files for the driver, which holds the lock) does none of these: it
    only writes files, while the driver appends the manifest.
    """

    def __init__(self, root: str | os.PathLike, lock: bool = True, worker: bool = False):
        """Open (and create) the folder; ``lock=False`` only reads it (``sdbatch status``).

        A locked folder is this process's alone until close(): a second run stops at once
        with a message naming the first (see sdbatch.lock). Under the lock, temporary files
        of killed runs are removed and symbolic links leading out of the folder refused.
        """
        self.root = Path(root)
        self.owner = lock and not worker  # a run's own instance: only it may reorganise what is there
        self._lock_key = None
        if worker:
            self.root.mkdir(parents=True, exist_ok=True)
        elif lock:
            from .lock import acquire

            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_key, first = acquire(self.root)
            try:
                self._check_links(tidy=first)
            except BaseException:
                self.close()
                raise
        self._lock = threading.Lock()
        # A compact index, so a resumed run of millions of items fits in a driver: per
        # finished item its manifest line's offset and its writers (packed in one int),
        # per item file the 64-bit hash of its path -> that line. Entries are read back
        # from the manifest when asked for (measured: ~4.3 KB per item as Entry objects).
        self._done: dict[str, int] = {}
        self._owners: dict[int, int] = {}
        self._writer_sets: list[tuple] = []
        self._reader = None
        self._cut_line = False
        self._unsynced: list[Path] = []  # item files written and renamed, not yet made durable (make_durable)
        self._unsynced_lock = threading.Lock()  # not _lock: that one is held across the manifest's fsync
        if not worker:
            self._read_manifest()
        run_files = self.root / RUN_FILES
        self.run_files: set[str] = set(json.loads(run_files.read_text())) if run_files.is_file() else set()

    # -- manifest -------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def _read_manifest(self) -> None:
        self._cut_line = False
        if not self.manifest_path.is_file():
            return
        offset = 0
        with open(self.manifest_path, "rb") as handle:
            for raw in handle:
                self._cut_line = not raw.endswith(b"\n")
                try:
                    data = json.loads(raw)
                except json.JSONDecodeError:
                    data = None  # a line cut by a kill: its item is simply not finished
                if data is not None and all((self.root / f["path"]).is_file() for f in data["files"]):
                    writers = data.get("writers") or sorted({f["writer"] for f in data["files"]})
                    self._index(data["id"], [f["path"] for f in data["files"]], writers, offset)
                offset += len(raw)

    def _index(self, item_id: str, paths: list, writers: list, offset: int) -> None:
        key = tuple(sorted(writers))
        try:
            code = self._writer_sets.index(key)
        except ValueError:
            code = len(self._writer_sets)
            self._writer_sets.append(key)
        self._done[item_id] = offset << 16 | code
        for path in paths:
            self._owners[_path_key(path)] = offset

    def __len__(self) -> int:
        """How many items are finished."""
        return len(self._done)

    def is_done(self, item_id: str, writers=()) -> bool:
        """Finished, and stored by each of ``writers`` (a writer added to a job re-stores old items)."""
        packed = self._done.get(item_id)
        return packed is not None and set(writers) <= set(self._writer_sets[packed & 0xFFFF])

    def entry(self, item_id: str) -> Entry | None:
        """A finished item's manifest entry, read back from the manifest."""
        packed = self._done.get(item_id)
        return None if packed is None else self._entry_at(packed >> 16)

    def _entry_at(self, offset: int) -> Entry:
        with self._lock:
            if self._reader is None:
                self._reader = open(self.manifest_path, "rb")
            self._reader.seek(offset)
            data = json.loads(self._reader.readline())
        writers = data.get("writers") or sorted({f["writer"] for f in data["files"]})
        return Entry(data["id"], data["index"], data["files"], data.get("item", {}), data.get("seconds", 0.0),
                     data.get("extra", {}), writers)

    def _owner(self, relpath: str) -> str | None:
        """The id of the finished item whose files include ``relpath``, if any."""
        offset = self._owners.get(_path_key(relpath))
        if offset is None:
            return None
        entry = self._entry_at(offset)
        return entry.id if any(f["path"] == relpath for f in entry.files) else None

    def record(self, entry: Entry) -> None:
        """Append a finished item's manifest line (after its files are durable)."""
        self.record_all([entry])

    def record_all(self, entries: list) -> None:
        """Append finished items' manifest lines in this order, with one fsync for them all."""
        lines = [json.dumps({"id": e.id, "index": e.index, "files": e.files, "item": e.item,
                             "seconds": round(e.seconds, 4), "extra": e.extra, "writers": e.writers},
                            ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n" for e in entries]
        if not lines:
            return
        self.make_durable()  # the files and their renames are durable before the lines that name them
        with self._lock:
            with open_append(self.manifest_path) as handle:
                if self._cut_line:  # a kill cut the last line: end it so ours stays readable
                    handle.write(b"\n")
                    self._cut_line = False
                offset = handle.seek(0, os.SEEK_END)
                handle.write(b"".join(lines))
                handle.flush()
                os.fsync(handle.fileno())
            for entry, line in zip(entries, lines):
                self._index(entry.id, [f["path"] for f in entry.files], entry.writers, offset)
                offset += len(line)

    # -- files ------------------------------------------------------------------------
    def write_bytes(self, relpath: str, data: bytes, item_id: str, writer: str) -> FileRecord:
        """Write a file atomically; refuse to replace another item's or a foreign file's content."""
        if _escapes(relpath):
            raise OutputConflict(f"output path {shorten(relpath)!r} escapes the output folder")
        target = self.root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        inside(self.root, target)
        digest = hashlib.sha256(data).hexdigest()
        if target.exists():
            owner = self._owner(relpath)
            same = _sha256_file(target) == digest
            if not same and owner != item_id:
                who = f"item {owner}" if owner else "a file not written by this job"
                raise OutputConflict(
                    f"{target} already holds {who} with different content; refusing to overwrite it. "
                    "Use a path template with {id}, or another output folder."
                )
        atomic_write(target, data, sync=False)
        with self._unsynced_lock:  # added after the rename, so a sync that takes it covers this file
            self._unsynced.append(target)
        return FileRecord(relpath, digest, writer)

    def make_durable(self) -> None:
        """Make the item files written so far durable, their bytes and their renames, all at once.

        record_all calls it before appending manifest lines; a worker that writes files for the
        driver calls it before it hands back their records. A kill before then loses nothing:
        the files' items are not in the manifest, so a resumed run writes them again. One sync
        for many files (see ``sync_written``) is what lets writer threads scale: an fsync per
        file costs a journal commit each, and threads' commits queue behind one another.
        """
        with self._unsynced_lock:
            files, self._unsynced = self._unsynced, []
        if files:
            sync_written(self.root, files)

    def write_run_file(self, relpath: str, data: bytes, writer: str) -> FileRecord:
        """Write a run-level file (a grid, an index); it replaces the one an earlier run made."""
        return self.write_run_file_via(relpath, lambda temp: temp.write_bytes(data), writer)

    def write_run_file_via(self, relpath: str, fill, writer: str) -> FileRecord:
        """Let ``fill(temp_path)`` write a run-level file (a video), then rename it into place.

        A killed run leaves at most a temporary file, never a partial file under the final name.
        """
        if _escapes(relpath):
            raise OutputConflict(f"output path {shorten(relpath)!r} escapes the output folder")
        owner = self._owner(relpath)
        if owner is not None:
            raise OutputConflict(f"{relpath} belongs to item {owner}; choose another path")
        target = self.root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        inside(self.root, target)
        temp = target.with_name(f".{target.name}.{os.getpid()}{TEMP_MARK}{target.suffix}")
        digest = ""

        def write(path: Path) -> None:
            nonlocal digest
            fill(path)
            digest = _sha256_file(path)
            self._claim_run_file(relpath, target, digest)
            fsync_file(path)

        _replace_via(temp, target, write)
        return FileRecord(relpath, digest, writer)

    def _claim_run_file(self, relpath: str, target: Path, digest: str) -> None:
        """Record ``relpath`` as this job's run file, refusing to replace a foreign file."""
        with self._lock:
            if relpath not in self.run_files:
                if target.exists() and _sha256_file(target) != digest:
                    raise OutputConflict(f"{target} already holds a file not written by this job with different "
                                         "content; refusing to overwrite it")
                self.run_files.add(relpath)
                atomic_write(self.root / RUN_FILES, json.dumps(sorted(self.run_files), indent=1).encode())

    def close(self) -> None:
        """Release the folder's lock (a killed process releases it too)."""
        if self._lock_key is not None:
            from .lock import release

            release(self._lock_key)
            self._lock_key = None

    def _check_links(self, tidy: bool) -> None:
        """Refuse to start where a planted symbolic link would redirect what sdbatch writes.

        The same walk removes temporary files of killed runs when ``tidy`` (only the first
        holder of the lock tidies, so no temporary belongs to a live run).
        """
        for name in (MANIFEST, RUN_FILES, "failures.jsonl", "summary.json", "job.yaml"):
            if (self.root / name).is_symlink():
                raise OutputConflict(f"{self.root / name} is a symbolic link; sdbatch writes only its own files in "
                                     "the output folder: remove the link")
        for folder, names, files in os.walk(self.root):
            for name in names:
                if os.path.islink(os.path.join(folder, name)):
                    inside(self.root, Path(folder) / name / "x")
        if tidy:
            self.remove_temporaries()

    def remove_temporaries(self) -> None:
        """Delete files left under temporary names (call only while nothing writes here).

        os.walk follows no symbolic link, so nothing outside the folder is touched.
        """
        for folder, _names, files in os.walk(self.root):
            for name in files:
                if TEMP_MARK in name:
                    os.unlink(os.path.join(folder, name))


def _path_key(relpath: str) -> int:
    """A stable 64-bit key for a relative path (the index keeps these, not the strings)."""
    return int.from_bytes(hashlib.blake2b(relpath.encode(), digest_size=8).digest(), "little")


def spooled(write) -> bytes:
    """The bytes ``write(file)`` writes, through a real file rather than a BytesIO.

    Pillow encodes into a real file with the GIL released; into a BytesIO its JPEG encoder
    holds it, so writer threads could not encode JPEGs at once. The bytes are the same.
    The file lives in memory where the system allows (Linux's memfd): a temporary file on
    disk would add a create and an unlink per image to the filesystem's journal, which the
    writers' fsyncs then wait for."""
    with _memory_file() as spool:
        write(spool)
        spool.seek(0)
        return spool.read()


def _memory_file():
    if hasattr(os, "memfd_create"):
        try:
            return os.fdopen(os.memfd_create("sdbatch-encode", getattr(os, "MFD_CLOEXEC", 0)), "w+b")
        except OSError:  # a kernel without memfd
            pass
    return tempfile.TemporaryFile()


def atomic_write(target: Path, data: bytes, sync: bool = True) -> None:
    """Write to a temporary name in the same folder, fsync, rename over the target, fsync the folder.

    ``sync=False`` leaves both fsyncs to the caller (OutputDir.make_durable makes many files
    durable at once); the rename still never exposes a partial file to a reader or a resume.

    The temporary name carries this process's pid; it is created afresh (never through a
    link someone planted there) and removed if anything fails, a full disk included.
    """
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(temp: Path) -> None:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            _write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    _replace_via(target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}{TEMP_MARK}"), target, write,
                 sync)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _replace_via(temp: Path, target: Path, write, sync_folder: bool = True) -> None:
    """``write(temp)``, rename it over ``target``, fsync the folder; whatever fails, no temporary stays."""
    _clear(temp)
    try:
        write(temp)
        os.replace(temp, target)
    except BaseException:  # a full disk, a conflict, an interrupt
        _clear(temp)
        raise
    if sync_folder:
        fsync_folder(target.parent)


SYNC_ENV = "SDBATCH_SYNC"  # "files": an fsync per file and folder instead of one sync of the filesystem


def sync_written(root: Path, files: list) -> None:
    """Make ``files`` (written and renamed, not yet synced) and their renames durable.

    On Linux this is one syncfs(2) of the output's filesystem: a single journal commit for
    the whole group, where an fsync per file costs one each (JPEGs at 512x512 encode in
    about 1.5 ms, so per-file fsyncs were a third of a writer thread's time and two
    threads' fsyncs queued in the journal). syncfs also writes back other processes' dirty
    data on that filesystem; where that is a lot (a disk shared with a busy job), set
    SDBATCH_SYNC=files. Elsewhere, or where syncfs fails, each file and then each folder is
    fsynced, which raises the error (a full disk, a lost connection) for the file it belongs to.
    """
    if os.environ.get(SYNC_ENV, "").strip().lower() != "files" and _syncfs(root):
        return
    for path in files:
        fsync_file(path)
    for folder in sorted({Path(path).parent for path in files}):
        fsync_folder(folder)


def fsync_file(path) -> None:
    """Make a file's bytes durable; an error (a full disk, a lost connection) is raised."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNCFS: list = []  # [libc's syncfs or None], looked up once


def _syncfs(root: Path) -> bool:
    """syncfs(2) on ``root``'s filesystem; False where the system has none or it failed."""
    if not _SYNCFS:
        try:
            import ctypes

            _SYNCFS.append(getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None))
        except (OSError, ImportError):  # no C library to load (not Linux)
            _SYNCFS.append(None)
    if _SYNCFS[0] is None:
        return False
    try:
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return False
    try:
        return _SYNCFS[0](fd) == 0
    finally:
        os.close(fd)


def fsync_folder(folder) -> None:
    """Make a rename in ``folder`` durable (a power cut after it keeps the new name)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename itself stands
        pass
    finally:
        os.close(fd)


def _clear(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
