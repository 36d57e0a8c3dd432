"""Running a planned job: the local executor, the run context writers see, and the run summary."""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .api import Writer
from .errors import DiskFull, SdbatchError
from .output import OutputDir, atomic_write, open_append
from .plugins import plugin_errors
from .progress import Progress
from .timing import drop_candidates, load_timing, measure_timing
from .writing import Committer, WriterPool, default_threads

SUMMARY = "summary.json"
FAILURES = "failures.jsonl"


@dataclass
class RunContext:
    """What writers get: the job, the output folder and the versions to record."""

    job: object
    out: OutputDir
    versions: dict
    job_name: str
    notes: dict = field(default_factory=dict)  # figures writers report, merged into summary.json


@dataclass
class Summary:
    total: int = 0
    already_done: int = 0
    rendered: int = 0
    failed: int = 0
    seconds: float = 0.0
    render_seconds: float = 0.0
    model_loads: int = 0
    run_files: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.rendered / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        return {**self.__dict__, "images_per_second": round(self.images_per_second, 4)}


def make_writers(job, context: RunContext) -> list:
    return [cls(options, context) for cls, options, _use in job.writers]


def run_context(job, out_dir, lock: bool = True) -> RunContext:
    from .metadata import versions

    name = job.spec.name or Path(job.filename).stem
    return RunContext(job, OutputDir(out_dir, lock=lock), versions(), name)


class LocalExecutor:
    """Renders in this process: batches items by batch key, writes on a pool of threads.

    Writing (encoding, file writes) overlaps rendering on ``write_threads`` threads (default: one
    per core), and the manifest line of an item is appended only once its files are durable.
    """

    name = "local"

    def __init__(self, job, registry, out_dir, batch_size: int | None = None, device: str | None = None,
                 quiet: bool = False, limit: int | None = None, write_threads: int | None = None):
        self.job, self.registry = job, registry
        self.context = run_context(job, out_dir)
        self.batch_size = batch_size or job.spec.batch_size
        self.device = device or job.spec.device
        self.quiet = quiet
        self.limit = limit
        self.write_threads = write_threads or default_threads()
        self.model_loads = 0
        self._renderer = None

    def run(self) -> Summary:
        try:
            return self._run()
        except OSError as exc:
            raise DiskFull.wrap(exc, self.context.out.root) or exc
        finally:
            self.context.out.close()  # releases the folder's lock for the next run

    def _run(self) -> Summary:
        job, out = self.job, self.context.out
        started = time.monotonic()
        total = len(job.plan) if self.limit is None else min(self.limit, len(job.plan))
        summary = Summary(total=total)
        reused = self._time_frames(total)
        writers = make_writers(job, self.context)
        finished = _finished_check(writers, out)
        if len(out) or any(type(w).covers is not Writer.covers for w in writers):  # a fresh run skips the scan
            summary.already_done = sum(1 for i in job.plan.items(0, total) if finished(i))
        if Path(job.filename).is_file():  # keep the job beside its outputs
            atomic_write(out.root / "job.yaml", Path(job.filename).read_bytes())
        progress = Progress(total, summary.already_done, quiet=self.quiet, title=self.context.job_name,
                            history=out.root / SUMMARY)
        entries_of = {w.name: self.registry.require("writer", w.name) for w in writers}  # names plugins in errors
        committer = Committer(writers, out, summary, progress, _record_failures)
        if reused:  # frames the timing pre-pass rendered: written (and committed) now, so the stream skips them
            early = WriterPool(writers, entries_of, committer, finished, self.write_threads)
            try:
                early.put(reused)
            finally:
                early.close()
            early.check()
        drop_candidates(out.root)  # the candidates' pictures: written, or not frames
        sink = WriterPool(writers, entries_of, committer, finished, self.write_threads)
        try:
            self._render_batches(_batches(job.plan.items(0, total), self.batch_size, finished), sink, summary)
        finally:
            sink.close()
            progress.close()
        sink.check()
        entries = FinishedEntries(out, job.plan, total)
        for writer in writers:
            with plugin_errors(entries_of[writer.name], fatal=True):
                summary.run_files += writer.finish(entries)
        summary.seconds = time.monotonic() - started
        summary.model_loads = self.model_loads
        summary.notes = self.context.notes
        atomic_write(out.root / SUMMARY, json.dumps(summary.to_json(), indent=2).encode())
        return summary

    def _time_frames(self, total: int) -> list:
        """Even-timed animations: measure the segments timing.json lacks, so the plan holds final frames.

        Returns the frames the pre-pass already rendered (as candidates), for the run to write."""
        say = None if self.quiet else lambda text: print(f"sdbatch: {text}", file=sys.stderr)
        report, reused = measure_timing(self.job.plan, self.context.out.root, self._render_now, total,
                                        self.batch_size, say)
        if report is not None:
            self.context.notes["timing"] = report
        return reused

    def _render_now(self, batches: list) -> list:
        """Render batches outside the run's stream (the timing pre-pass), results in order; errors are raised."""
        renderer = self._local_renderer()
        return [result for batch in batches for result in renderer.render(batch)]

    def _local_renderer(self):
        """One Renderer for the run, so the model loads once."""
        if self._renderer is None:
            import torch

            from .render import Renderer

            if self.job.spec.threads:
                torch.set_num_threads(self.job.spec.threads)
            self._renderer = Renderer(self.registry, self.device, self.job.spec.dtype, self.job.plan.models,
                                      pad_batches_to=self.batch_size if _is_gpu(self.device) else None,
                                      batch_invariant=self.job.spec.batch_invariant)
        return self._renderer

    def _render_batches(self, batches, sink, summary) -> None:
        """Render in this process."""
        renderer = self._local_renderer()
        for batch in batches:
            sink.check()
            self._render(renderer, batch, sink, summary)
        self.model_loads = renderer.cache.loads

    def _render(self, renderer, batch, sink, summary, attempt: int = 0) -> None:
        began = time.monotonic()
        try:
            results = renderer.render(batch)
        except (KeyboardInterrupt, SdbatchError):
            raise
        except Exception as exc:  # one bad item must not stop a long run
            full = DiskFull.wrap(exc, self.context.out.root)
            if full:  # no item can succeed: stop, resumable
                raise full from exc
            if len(batch) > 1:
                # Pixels never depend on batch composition, so render the items alone to find the bad ones.
                for item in batch:
                    self._render(renderer, [item], sink, summary)
                return
            if attempt < self.job.spec.retries:  # transient trouble (memory, I/O) gets another go
                self._render(renderer, batch, sink, summary, attempt + 1)
                return
            summary.failed += 1
            _record_failures(self.context.out.root, batch, exc)
            sink.progress.update(1, rendered=False)
            return
        seconds = (time.monotonic() - began) / len(batch)
        summary.render_seconds += time.monotonic() - began
        for result in results:
            result.seconds = seconds
        sink.put(results)


def _is_gpu(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and _cuda_available())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class FinishedEntries:
    """The finished items' manifest entries in plan order, read lazily (each pass walks the plan).

    Iterable any number of times, with len(); a writer that needs a list makes one itself.
    """

    def __init__(self, out: OutputDir, plan, total: int):
        self.out, self.plan, self.total = out, plan, total
        self._count = None

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for item in self.plan.items(0, self.total) if self.out.is_done(item.id))
        return self._count

    def __iter__(self):
        for item in self.plan.items(0, self.total):
            entry = self.out.entry(item.id)
            if entry is not None:
                yield entry


def _finished_check(writers: list, out: OutputDir):
    """item -> finished: every writer has stored it (in the manifest, or by its own record, e.g. a shard)."""

    def finished(item) -> bool:
        needed = [writer.name for writer in writers if not writer.covers(item)]
        return not needed or out.is_done(item.id, needed)

    return finished


def _batches(items, batch_size: int, finished):
    """Groups of up to batch_size unfinished items sharing a batch key, streamed from the plan.

    Nothing per item is kept here, so the driver's memory stays flat however long the plan;
    an id planned twice may render twice, and the writer stores it once.
    """
    pending: dict[tuple, list] = {}
    for item in items:
        if finished(item):
            continue
        group = pending.setdefault(item.batch_key(), [])
        group.append(item)
        if len(group) >= batch_size:
            yield pending.pop(item.batch_key())
    yield from pending.values()


def _record_failures(root: Path, batch, error, trace: str | None = None) -> None:
    """Append the items' failure lines; ``error`` is the exception or, from a worker, its message."""
    import sys

    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    trace = traceback.format_exc(limit=5) if trace is None else trace
    print(f"sdbatch: {len(batch)} item(s) failed: {message}", file=sys.stderr)
    lines = "".join(json.dumps({"id": item.id, "index": item.index, "error": message,
                                "traceback": trace}) + "\n" for item in batch)
    try:
        with open_append(root / FAILURES) as handle:
            handle.write(lines.encode("utf-8"))
    except OSError as exc:
        raise DiskFull.wrap(exc, root) or exc


def run_status(out_dir, registry) -> dict:
    """Progress of a run from its output folder alone: items done and failed, shards, last speed."""
    out_dir = Path(out_dir)
    job_file = out_dir / "job.yaml"
    if not job_file.is_file():
        raise SdbatchError(f"{out_dir} has no job.yaml: not an sdbatch output folder (or nothing ran yet)")
    from .job import load_job

    job = load_job(job_file, registry)
    load_timing(job.plan, out_dir)
    context = run_context(job, out_dir, lock=False)  # only reads: a live run's files stay untouched
    finished = _finished_check(make_writers(job, context), context.out)
    done_ids = {item.id for item in job.plan if finished(item)}  # one pass over the plan
    failures = out_dir / FAILURES
    failed_ids = {json.loads(line)["id"] for line in failures.read_text().splitlines() if line.strip()} \
        if failures.is_file() else set()
    summary = json.loads((out_dir / SUMMARY).read_text()) if (out_dir / SUMMARY).is_file() else {}
    return {"job": job.spec.name or job_file.stem, "total": len(job.plan), "done": len(done_ids),
            "failed": len(failed_ids - done_ids),
            "notes": context.notes or summary.get("notes", {}), "last_run": summary}
