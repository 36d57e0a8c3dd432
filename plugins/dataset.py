"""Datasets: WebDataset tar shards with a Parquet metadata file per shard, resumable by shard.

Shard membership is a pure function of the plan index (shard = index // shard_size), so
a rerun rebuilds identical shards. Each finished item is first staged (image + record)
in the output folder; when every item of a shard is staged or has failed, the shard is
packed: the tar and the Parquet file are written under temporary names and renamed,
then the ``{shard}_stats.json`` marker is written last and the staged files removed.
A shard with a marker is finished; its items are not rendered again.

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
from sdbatch.output import TEMP_MARK

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
    parallel = True  # staging state lives in the output folder, not in this instance

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        import fsspec

        self.url = options.url or str(context.out.root / "dataset")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.fs.makedirs(self.root, exist_ok=True)
        self.total = len(context.job.plan)
        self.finished = self._markers()

    def _markers(self) -> set:
        """Shards with a stats marker: finished."""
        return {int(p.rsplit("/", 1)[-1][:5]) for p in self.fs.glob(f"{self.root}/*_stats.json")}

    # -- planning ------------------------------------------------------------------------
    def shard_of(self, index: int) -> int:
        return index // self.options.shard_size

    def shard_indices(self, shard: int) -> range:
        size = self.options.shard_size
        return range(shard * size, min((shard + 1) * size, self.total))

    def progress_note(self) -> str:
        return f"shards {len(self.finished)}/{-(-self.total // self.options.shard_size)}"

    def covers(self, item) -> bool:
        return self.shard_of(item.index) in self.finished

    # -- per item ------------------------------------------------------------------------
    def write(self, result) -> list:
        item = result.item
        shard = self.shard_of(item.index)
        if shard in self.finished:
            return []
        image = _encode(result.image, self.options)
        record = {**item.to_json(), "model_hash": result.model_hash, "shard": shard}
        folder = f"{STAGING}/{shard:05d}"
        out = self.context.out
        files = [out.write_bytes(f"{folder}/{item.index:09d}.{self.options.format}", image, item.id, self.name),
                 out.write_bytes(f"{folder}/{item.index:09d}.json", json.dumps(record).encode(), item.id, self.name)]
        if len(self._staged(shard)) == len(self.shard_indices(shard)) and self._claim(shard):
            self.pack(shard, failures={})
        return [f.to_json() for f in files]

    def _staged(self, shard: int) -> set:
        """Indices staged for a shard, read from the folder (other threads and workers stage there too).

        The record is written after the image, so a record means a complete sample.
        """
        folder = self.context.out.root / STAGING / f"{shard:05d}"
        names = os.listdir(folder) if folder.is_dir() else []
        return {int(name[:9]) for name in names if name.endswith(".json") and name[:9].isdigit()}

    def _claim_path(self, shard: int):
        return self.context.out.root / STAGING / f"{shard:05d}.packing{TEMP_MARK}"

    def _claim(self, shard: int) -> bool:
        """True for the one caller that may pack this shard now (several may stage its last samples)."""
        try:
            os.close(os.open(self._claim_path(shard), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    # -- per run -------------------------------------------------------------------------
    def finish(self, entries) -> list:
        """Pack shards whose every item is staged or failed (a resumed run's leftovers too)."""
        failures = _failures(self.context.out.root)
        self.finished |= self._markers()  # shards packed by writer threads or workers
        self._drop_stale_staging()
        written = []
        for shard in range((self.total + self.options.shard_size - 1) // self.options.shard_size):
            if shard in self.finished:
                continue
            indices, staged = self.shard_indices(shard), self._staged(shard)
            failed = {i: failures[i] for i in indices if i in failures and i not in staged}
            if all(i in staged or i in failed for i in indices):
                written.append(self.pack(shard, failed))
        self.context.notes["dataset"] = {"url": self.url, "shards_done": len(self.finished),
                                         "shards_total": -(-self.total // self.options.shard_size)}
        return [w for w in written if w]

    def _drop_stale_staging(self) -> None:
        """Remove samples staged again for a shard already packed (a retried batch of a killed worker)."""
        import shutil

        staging = self.context.out.root / STAGING
        for folder in staging.iterdir() if staging.is_dir() else ():
            if folder.is_dir() and folder.name.isdigit() and int(folder.name) in self.finished:
                shutil.rmtree(folder, ignore_errors=True)

    def pack(self, shard: int, failures: dict) -> str:
        """Write one shard (tar, parquet, then the stats marker) from its staged samples."""
        import shutil

        folder = self.context.out.root / STAGING / f"{shard:05d}"
        rows, tar = [], io.BytesIO()
        import webdataset

        with webdataset.TarWriter(tar, mtime=0.0, encoder=False) as sink:  # fixed mtime: identical reruns
            for index in self.shard_indices(shard):
                if index in failures:
                    rows.append(_failed_row(index, shard, failures[index]))
                    continue
                record = json.loads((folder / f"{index:09d}.json").read_text())
                image = (folder / f"{index:09d}.{self.options.format}").read_bytes()
                key = f"{index:09d}"
                sink.write({"__key__": key, self.options.format: image, "txt": record["prompt"].encode(),
                            "json": json.dumps(record, sort_keys=True).encode()})
                rows.append(_row(key, record, image))
        name = f"{self.root}/{shard:05d}"
        self._put(f"{name}.tar", tar.getvalue())
        self._put(f"{name}.parquet", _parquet(rows))
        stats = {"shard": shard, "count": len(rows), "successes": sum(r["status"] == "ok" for r in rows),
                 "failed": len(failures)}
        self._put(f"{name}_stats.json", json.dumps(stats, indent=1).encode())  # the marker, last
        self.finished.add(shard)
        shutil.rmtree(folder, ignore_errors=True)
        self._claim_path(shard).unlink(missing_ok=True)
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
