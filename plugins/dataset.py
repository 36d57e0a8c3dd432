"""Datasets: WebDataset tar shards with a Parquet metadata file per shard, resumable by shard.

Shard membership is a pure function of the plan index (shard = index // shard_size), so
a rerun rebuilds identical shards. Each finished item is first staged (image + record)
in the output folder, by index and not by shard. A shard is packed when every item of it
is staged or has failed: the tar and the Parquet file are written under temporary names
and renamed, then the ``{shard}_stats.json`` marker is written last (``complete: true``)
and the staged files removed. At the end of a run every shard holding a staged item is
packed too, short (``complete: false``), keeping its staged files: every rendered item is
readable when a run ends, and the shard is rebuilt when more of its items exist.
Shards packed with another ``shard_size`` are unpacked back into staging and re-packed:
rendered work is never deleted and a new shard size never re-renders.
Shards go through fsspec, so ``url:`` may be a bucket (``s3://...``) or ``memory://``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Literal

from sdbatch import hookimpl
from sdbatch.api import Writer

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

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
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
        """index -> (item id, path stem) of every staged item, whatever layout staged it."""
        if self._staged is None:
            self._staged = {}
            for path in (self.context.out.root / STAGING).rglob("*.json"):
                record = json.loads(path.read_text())
                self._staged[record["index"]] = (record["id"], path.with_suffix(""))
        return self._staged

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
        self._repack_stale()
        item = result.item
        shard = self.shard_of(item.index)
        if shard in self.finished:
            return []
        image = _encode(result.image, self.options)
        record = {**item.to_json(), "model_hash": result.model_hash, "shard": shard}
        files = self._stage(item.index, item.id, json.dumps(record).encode(), image, self.options.format)
        if all(i in self.staged for i in self.shard_indices(shard)):
            self.pack(shard, failures={})
        return [f.to_json() for f in files]

    # -- per run -------------------------------------------------------------------------
    def finish(self, entries) -> list:
        """Pack every shard with staged items: complete ones for good, the others short."""
        self._repack_stale()
        failures = _failures(self.context.out.root)
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

    def pack(self, shard: int, failures: dict) -> str:
        """Write one shard (tar, parquet, then the stats marker) from its staged samples.

        A complete shard's staged files are removed after its marker; a short one keeps them,
        so it can be rebuilt with the rest of its items.
        """
        rows, tar = [], io.BytesIO()
        import webdataset

        present = [i for i in self.shard_indices(shard) if i in self.staged or i in failures]
        complete = len(present) == len(self.shard_indices(shard))
        with webdataset.TarWriter(tar, mtime=0.0, encoder=False) as sink:  # fixed mtime: identical reruns
            for index in present:
                if index in failures:
                    rows.append(_failed_row(index, shard, failures[index]))
                    continue
                stem = self.staged[index][1]
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
                if index in self.staged:
                    for path in self.staged.pop(index)[1].parent.glob(f"{index:09d}.*"):
                        path.unlink()
        return f"{name}.tar"

    def _put(self, path: str, data: bytes) -> None:
        """Write to a temporary name and move into place (no half-written shard under its name)."""
        temp = f"{path}.sdbatch-tmp"
        with self.fs.open(temp, "wb") as handle:
            handle.write(data)
        self.fs.mv(temp, path)


def _encode(image, options) -> bytes:
    buffer = io.BytesIO()
    if options.format == "png":
        image.save(buffer, "PNG", compress_level=4)
    else:
        image.save(buffer, "JPEG" if options.format == "jpg" else "WEBP", quality=options.quality)
    return buffer.getvalue()


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
