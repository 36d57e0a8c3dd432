"""Datasets: WebDataset tar shards with a Parquet metadata file per shard, resumable by shard.

Shard membership is a pure function of the plan index (shard = index // shard_size), so
a rerun rebuilds identical shards. Each finished item is first staged (image + record)
in the output folder, by index and not by shard. A shard is packed when every item of it
is staged or has failed: the tar and the Parquet file are written under temporary names
and renamed, then the ``{shard}_stats.json`` marker is written last (``complete: true``)
and the staged files removed. At the end of a run every shard holding a staged item is
packed too, short (``complete: false``), keeping its staged files: every rendered item is
readable when a run ends, and the shard is rebuilt when more of its items exist.
Shards packed with another ``shard_size`` are unpacked back into staging and re-packed
(by the run's own instance, before anything renders): rendered work is never deleted and
a new shard size never re-renders.

Staging runs in parallel (writer threads, Ray workers): whoever stages a shard's last
sample packs it, after claiming it with a file created exclusively, so it is packed once;
a claim left by a killed packer is a temporary, and the run's ``finish`` packs that shard.
Shards go through fsspec, so ``url:`` may be a bucket (``s3://...``) or ``memory://``.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Literal

from sdbatch import hookimpl
from sdbatch.api import Writer
from sdbatch.output import TEMP_MARK, fsync_folder, spooled

STAGING = ".dataset-staging"


@dataclass
class DatasetOptions:
    shard_size: int = field(default=1000, metadata={"min": 1, "max": 1_000_000})
    format: Literal["png", "jpg", "webp"] = "png"
    quality: int = field(default=95, metadata={"min": 1, "max": 100, "help": "jpg/webp quality"})
    url: str | None = field(default=None, metadata={"help": "where shards go (fsspec URL or path); default OUT/dataset"})


class WebDatasetWriter(Writer):
    """``{key}.png|jpg|webp``, ``{key}.txt`` (the prompt) and ``{key}.json`` (the item) per sample."""

    name = "webdataset"
    description = "WebDataset tar shards + Parquet metadata per shard"
    Options = DatasetOptions

    parallel = True  # staging is per index, and a shard is packed once under an exclusive claim

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        import threading

        import fsspec

        self.url = options.url or str(context.out.root / "dataset")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.fs.makedirs(self.root, exist_ok=True)
        self.total = len(context.job.plan)
        self.finished: set[int] = set()  # complete shards of this shard size
        self.packed: dict[int, dict] = {}  # shard -> its stats, complete or short
        self._staged: dict[int, tuple] | None = None  # index -> (id, staged path without extension)
        self.stale: list[dict] = []  # markers of shards packed with another shard size
        self._stale_ids: dict[int, str] | None = None
        self._scan_lock = threading.Lock()
        self._read_markers()
        if context.out.owner:  # the run's own folder (not a worker's, not `status`): before anything writes
            self._repack_stale()

    def _read_markers(self) -> None:
        self.finished, self.packed = set(), {}
        for path in self.fs.glob(f"{self.root}/*_stats.json"):
            self._read_marker(path)

    def _read_marker(self, path: str) -> None:
        with self.fs.open(path, "rb") as handle:
            stats = json.loads(handle.read())
        if stats.get("shard_size", self.options.shard_size) != self.options.shard_size:
            self.stale.append(stats)  # re-packed by the next write or finish, never re-rendered
            return
        self.packed[stats["shard"]] = stats
        if stats.get("complete", True):  # markers without the flag were only written for complete shards
            self.finished.add(stats["shard"])

    # -- planning ------------------------------------------------------------------------
    def shard_of(self, index: int) -> int:
        return index // self.options.shard_size

    def shard_indices(self, shard: int) -> range:
        size = self.options.shard_size
        return range(shard * size, min((shard + 1) * size, self.total))

    def progress_note(self) -> str:
        return f"shards {len(self.finished)}/{-(-self.total // self.options.shard_size)}"

    def covers(self, item) -> bool:
        """In a complete shard, or staged (rendered, waiting for the rest of its shard)."""
        staged = self.staged.get(item.index)
        return (self.shard_of(item.index) in self.finished or (staged is not None and staged[0] == item.id)
                or self.stale_ids.get(item.index) == item.id)

    @property
    def stale_ids(self) -> dict:
        """index -> id of the samples in shards of another shard size (read, not moved)."""
        if self._stale_ids is None:
            import pyarrow.parquet as pq

            self._stale_ids = {}
            for stats in self.stale:
                with self.fs.open(f"{self.root}/{stats['shard']:05d}.parquet", "rb") as handle:
                    for row in pq.read_table(handle, columns=["index", "id", "status"]).to_pylist():
                        if row["status"] == "ok":
                            self._stale_ids[row["index"]] = row["id"]
        return self._stale_ids

    def _repack_stale(self) -> None:
        """Unpack every shard of another shard size into staging (once per run)."""
        while self.stale:
            self._unpack(self.stale.pop())
        self._stale_ids = {}

    # -- staging -------------------------------------------------------------------------
    @property
    def staged(self) -> dict:
        """index -> (item id, path stem) of the items staged when first asked, whatever layout staged them,
        and of those this instance staged since (other threads and workers stage too: see _is_staged)."""
        with self._scan_lock:
            if self._staged is None:
                staged = {}
                for path in (self.context.out.root / STAGING).rglob("*.json"):
                    record = json.loads(path.read_text())
                    staged[record["index"]] = (record["id"], path.with_suffix(""))
                self._staged = staged
        return self._staged

    def _stem(self, index: int):
        """Where an item is staged (without extension): as scanned, else this version's layout."""
        known = self.staged.get(index)
        return known[1] if known else self.context.out.root / STAGING / f"{index // 10000:05d}" / f"{index:09d}"

    def _is_staged(self, index: int) -> bool:
        """Read from the folder: the record is written after the image, so a record means a whole sample."""
        return self._stem(index).with_suffix(".json").is_file()

    def _shard_staged(self, shard: int) -> bool:
        return all(self._is_staged(i) for i in self.shard_indices(shard))  # stops at the first missing one

    def _claim_path(self, shard: int):
        return self.context.out.root / STAGING / f"{shard:05d}.packing{TEMP_MARK}"

    def _claim(self, shard: int) -> bool:
        """True for the one caller that may pack this shard now (several may stage its last samples)."""
        self._claim_path(shard).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self._claim_path(shard), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def _packed_complete(self, shard: int) -> bool:
        """Whether the shard's marker (maybe written by another thread or worker) says complete."""
        path = f"{self.root}/{shard:05d}_stats.json"
        if not self.fs.exists(path):
            return False
        with self.fs.open(path, "rb") as handle:
            stats = json.loads(handle.read())
        return stats.get("shard_size") == self.options.shard_size and stats.get("complete", True)

    def _stage(self, index: int, item_id: str, record: bytes, image: bytes, ext: str) -> list:
        """Store one sample's files under STAGING, by index (a shard size change moves nothing)."""
        stem = f"{STAGING}/{index // 10000:05d}/{index:09d}"
        out = self.context.out
        files = [out.write_bytes(f"{stem}.{ext}", image, item_id, self.name),
                 out.write_bytes(f"{stem}.json", record, item_id, self.name)]
        self.staged[index] = (item_id, out.root / stem)
        return files

    def _unpack(self, stats: dict) -> None:
        """Move a shard of another shard size back into staging, then remove it (marker first)."""
        import tarfile

        name = f"{self.root}/{stats['shard']:05d}"
        if self.fs.exists(f"{name}.tar"):
            with self.fs.open(f"{name}.tar", "rb") as handle, tarfile.open(fileobj=handle) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
            for member, data in members.items():
                key, ext = member.split(".", 1)
                if ext in ("json", "txt"):
                    continue
                record = json.loads(members[f"{key}.json"])
                if record["index"] not in self.staged:
                    self._stage(record["index"], record["id"], members[f"{key}.json"], data, ext)
        for suffix in ("_stats.json", ".tar", ".parquet"):
            if self.fs.exists(name + suffix):
                self.fs.rm(name + suffix)

    # -- per item ------------------------------------------------------------------------
    def write(self, result) -> list:
        item = result.item
        shard = self.shard_of(item.index)
        if shard in self.finished:
            return []
        image = _encode(result.image, self.options)
        # width and height are the picture's (a hires item's second pass is larger than the item's size)
        width, height = result.image.size
        record = {**item.to_json(), "width": width, "height": height, "model_hash": result.model_hash, "shard": shard}
        files = self._stage(item.index, item.id, json.dumps(record).encode(), image, self.options.format)
        if self._shard_staged(shard) and self._claim(shard):
            try:  # re-checked under the claim: another packer may have finished this shard meanwhile
                if not self._packed_complete(shard) and self._shard_staged(shard):
                    self.pack(shard, failures={})
            finally:
                self._claim_path(shard).unlink(missing_ok=True)
        # No file records for the manifest: staged files go when their shard is complete, and a
        # manifest line naming a missing file reads as unfinished, so the item's other writers
        # would render it again. The shard is this writer's record of the item (``covers``).
        del files
        return []

    # -- per run -------------------------------------------------------------------------
    def finish(self, entries) -> list:
        """Pack every shard with staged items: complete ones for good, the others short."""
        self._repack_stale()
        failures = _failures(self.context.out.root)
        self._read_markers()  # shards packed by writer threads or workers
        self._staged = None  # and the samples they staged
        self._drop_restaged()
        written = []
        touched = {self.shard_of(i) for i in [*self.staged, *failures] if i < self.total}
        for shard in sorted(touched - self.finished):
            indices = self.shard_indices(shard)
            failed = {i: failures[i] for i in indices if i in failures and i not in self.staged}
            staged = sum(1 for i in indices if i in self.staged)
            previous = self.packed.get(shard, {})
            if previous.get("successes") == staged and previous.get("failed") == len(failed):
                continue  # this short shard already holds exactly these items
            written.append(self.pack(shard, failed))
        self.context.notes["dataset"] = {"url": self.url, "shards_done": len(self.finished),
                                         "shards_short": len(set(self.packed) - self.finished),
                                         "shards_total": -(-self.total // self.options.shard_size)}
        return [w for w in written if w]

    def _drop_restaged(self) -> None:
        """Remove samples staged again for a shard already complete (a retried batch of a killed worker)."""
        for index in [i for i in self.staged if self.shard_of(i) in self.finished]:
            self._unstage(index)

    def _unstage(self, index: int) -> None:
        known = self.staged.pop(index, None)
        stem = known[1] if known else self._stem(index)
        for path in stem.parent.glob(f"{index:09d}.*"):
            path.unlink(missing_ok=True)

    def pack(self, shard: int, failures: dict) -> str:
        """Write one shard (tar, parquet, then the stats marker) from its staged samples.

        A complete shard's staged files are removed after its marker; a short one keeps them,
        so it can be rebuilt with the rest of its items.
        """
        rows, tar = [], io.BytesIO()
        import webdataset

        present = [i for i in self.shard_indices(shard) if i in failures or self._is_staged(i)]
        complete = len(present) == len(self.shard_indices(shard))
        with webdataset.TarWriter(tar, mtime=0.0, encoder=False) as sink:  # fixed mtime: identical reruns
            for index in present:
                if index in failures:
                    rows.append(_failed_row(index, shard, failures[index]))
                    continue
                stem = self._stem(index)
                record = json.loads(stem.with_suffix(".json").read_text())
                record["shard"] = shard  # staged under another shard size, perhaps
                image = stem.with_suffix(f".{self.options.format}").read_bytes()
                key = f"{index:09d}"
                sink.write({"__key__": key, self.options.format: image, "txt": record["prompt"].encode(),
                            "json": json.dumps(record, sort_keys=True).encode()})
                rows.append(_row(key, record, image))
        name = f"{self.root}/{shard:05d}"
        self._put(f"{name}.tar", tar.getvalue())
        self._put(f"{name}.parquet", _parquet(rows))
        stats = {"shard": shard, "shard_size": self.options.shard_size, "complete": complete, "count": len(rows),
                 "successes": sum(r["status"] == "ok" for r in rows), "failed": len(failures)}
        self._put(f"{name}_stats.json", json.dumps(stats, indent=1).encode())  # the marker, last
        self.packed[shard] = stats
        if complete:
            self.finished.add(shard)
            for index in present:
                if index not in failures:
                    self._unstage(index)
        return f"{name}.tar"

    def _put(self, path: str, data: bytes) -> None:
        """Write to a temporary name and move into place (no half-written shard under its name)."""
        temp = f"{path}.sdbatch-tmp"
        try:
            with self.fs.open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                if hasattr(handle, "fileno") and self.fs.protocol in ("file", ("file", "local")):
                    os.fsync(handle.fileno())  # a local shard survives a power cut once renamed
            self.fs.mv(temp, path)
        except BaseException:
            if self.fs.exists(temp):
                self.fs.rm(temp)
            raise
        if self.fs.protocol in ("file", ("file", "local")):
            fsync_folder(self.root)


def _encode(image, options) -> bytes:
    if options.format == "png":
        return spooled(lambda file: image.save(file, "PNG", compress_level=4))
    return spooled(lambda file: image.save(file, "JPEG" if options.format == "jpg" else "WEBP", quality=options.quality))


def _row(key: str, record: dict, image: bytes) -> dict:
    import hashlib

    fields = ("id", "index", "prompt", "negative_prompt", "seed", "steps", "guidance", "sampler", "width", "height",
              "model", "model_hash", "shard")
    return {"key": key, **{f: record[f] for f in fields}, "sha256": hashlib.sha256(image).hexdigest(),
            "status": "ok", "error": None, "item": json.dumps(record, sort_keys=True)}


def _failed_row(index: int, shard: int, failure: dict) -> dict:
    return {"key": f"{index:09d}", "id": failure["id"], "index": index, "shard": shard, "status": "failed",
            "error": failure["error"]}


def _parquet(rows: list) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "key": pa.string(), "id": pa.string(), "index": pa.int64(), "prompt": pa.string(),
        "negative_prompt": pa.string(), "seed": pa.int64(), "steps": pa.int32(), "guidance": pa.float64(),
        "sampler": pa.string(), "width": pa.int32(), "height": pa.int32(), "model": pa.string(),
        "model_hash": pa.string(), "shard": pa.int32(), "sha256": pa.string(), "status": pa.string(),
        "error": pa.string(), "item": pa.string(),
    }
    table = pa.table({name: [row.get(name) for row in rows] for name in columns},
                     schema=pa.schema(list(columns.items())))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _failures(root) -> dict:
    """index -> last failure record, from failures.jsonl."""
    path = root / "failures.jsonl"
    failures = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            failures[record["index"]] = record
    return failures


@hookimpl(trylast=True)
def register_writers(register):
    """WebDataset shards with Parquet metadata."""
    register(WebDatasetWriter, aliases=("wds",))
