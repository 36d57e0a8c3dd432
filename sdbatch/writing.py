"""Writing results: writers run in a pool of threads (or on Ray workers); the driver commits manifest lines.

Writing one item (encoding, hashing, the atomic file writes) is ``write_item``: it runs
wherever the pixels are and gives back a small ``Written`` record. ``Committer`` turns
records into manifest lines in the driver, in the order it is given them. ``WriterPool``
is the local executor's: it writes on several threads, since PIL's encoders and zlib
release the GIL, and commits in the order results were put, so the manifest reads as a
one-thread run's would. Its queue is bounded: a render loop faster than writing waits.
While writing lags rendering it commits in groups (one sync of the group's files, one manifest fsync);
otherwise each record as soon as it is ready.
"""

from __future__ import annotations

import os
import queue
import threading
import traceback
from dataclasses import dataclass

from .api import Writer
from .output import Entry
from .plugins import PluginCallError, plugin_errors


@dataclass
class Written:
    """What writing one item leaves for the driver: its file records, or why it failed. No pixels."""

    item: object  # the Item
    files: list
    model_hash: str
    seconds: float
    error: str | None = None  # a writer failed on this item: it is recorded as failed
    trace: str = ""


def runs_in_parallel(writer) -> bool:
    """May this writer's (a class or an instance) ``write`` run in several threads or processes at once?"""
    cls = writer if isinstance(writer, type) else type(writer)
    return cls.parallel or cls.write is Writer.write


def write_item(writers: list, entries_of: dict, result, serial_lock=None) -> Written:
    """Run every writer on one result; a plugin error fails the item, a SdbatchError stops the run.

    Writers not declared ``parallel`` write while holding ``serial_lock``, one at a time.
    """
    files = []
    try:
        for writer in writers:
            with plugin_errors(entries_of[writer.name]):
                if serial_lock is None or runs_in_parallel(writer):
                    files += writer.write(result)
                else:
                    with serial_lock:
                        files += writer.write(result)
    except PluginCallError as exc:
        return Written(result.item, [], result.model_hash, result.seconds, f"{type(exc).__name__}: {exc}",
                       traceback.format_exc(limit=5))
    return Written(result.item, files, result.model_hash, result.seconds)


def default_threads() -> int:
    """Writer threads for this machine: one per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Committer:
    """Appends manifest lines for written items (in the driver) and counts them in the summary.

    Not thread-safe: one caller at a time (the pool commits under its order lock).
    """

    def __init__(self, writers: list, out, summary, progress, record_failures):
        self.writers, self.out, self.summary, self.progress = writers, out, summary, progress
        self.names = [writer.name for writer in writers]
        self.record_failures = record_failures  # (root, items, message, trace): run.py's failures.jsonl

    def commit(self, records: list) -> None:
        """Commit records in this order: one manifest append (one fsync) for the finished ones."""
        entries, committed, failed = [], set(), 0
        for written in records:
            item = written.item
            if written.error is not None:
                failed += 1
                self.summary.failed += 1
                self.record_failures(self.out.root, [item], written.error, written.trace)
            elif item.id not in committed and not self.out.is_done(item.id, self.names):  # an id planned twice
                committed.add(item.id)
                record = {**item.to_json(), "model_hash": written.model_hash}
                entries.append(Entry(item.id, item.index, written.files, record, written.seconds,
                                     writers=list(self.names)))
        self.out.record_all(entries)
        self.summary.rendered += len(entries)
        if entries:
            self.progress.note("; ".join(filter(None, (writer.progress_note() for writer in self.writers))))
        self.progress.update(len(entries))
        if failed:
            self.progress.update(failed, rendered=False)


COMMIT_GROUP = 8  # records per manifest append while more wait to be written


class WriterPool:
    """Writes results on ``threads`` threads; commits their manifest lines in the order they were put.

    ``put`` blocks while ``2 x threads`` results wait (back-pressure on the render loop), and
    re-raises in the caller's thread the error that stopped a writer thread.

    Records ready in order are committed at once when nothing else is being written (a
    render loop slower than writing sees every item committed as it is done), and
    otherwise in groups of COMMIT_GROUP: one sync of the group's files (OutputDir.make_durable)
    and one fsync of the manifest, instead of several per item, which the disk would serialise
    across threads.
    A kill loses at most an uncommitted group's manifest lines; resume writes those items again.
    """

    def __init__(self, writers: list, entries_of: dict, committer: Committer, finished, threads: int):
        self.writers, self.entries_of, self.committer, self.finished = writers, entries_of, committer, finished
        self.progress = committer.progress
        self.tasks: queue.Queue = queue.Queue(maxsize=2 * threads)
        self.serial_lock = threading.Lock()  # writers not declared parallel take turns
        self.order_lock = threading.Lock()
        self.ready: dict[int, Written | None] = {}  # sequence number -> record, until its turn
        self.next_put = self.next_commit = 0
        self.committing = False  # a thread is committing: others file their records and go on
        self.pending: set[str] = set()  # ids put and not yet committed (an id planned twice is written once)
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._loop, name=f"sdbatch-writer-{n}", daemon=True)
                        for n in range(threads)]
        for thread in self.threads:
            thread.start()

    def put(self, results) -> None:
        for result in results:
            self.check()
            item = result.item
            if item.id in self.pending or self.finished(item):
                continue
            self.pending.add(item.id)
            self.tasks.put((self.next_put, result))
            self.next_put += 1

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        for _ in self.threads:
            self.tasks.put(None)
        for thread in self.threads:
            thread.join()
        self.committing = True  # the writer threads are gone: commit what a group held back
        self._commit_due(force=True)

    def _loop(self) -> None:
        while True:
            task = self.tasks.get()
            if task is None:
                return
            sequence, result = task
            written = None
            if self.error is None:  # after a failure, drain; the render loop raises it
                try:
                    written = write_item(self.writers, self.entries_of, result, self.serial_lock)
                except BaseException as exc:  # noqa: BLE001 - surfaced by check()
                    self.error = exc
            del result  # the pixels go now, not when the next task comes
            self._commit_in_order(sequence, written)

    def _commit_in_order(self, sequence: int, written: Written | None) -> None:
        """File the record; if no thread is committing, become the committer until nothing is due.

        Commits (two syncs) run outside ``order_lock``, so other threads file records and
        go on writing meanwhile; one committer at a time keeps the manifest in order.
        """
        with self.order_lock:
            self.ready[sequence] = written
            if self.committing:
                return
            self.committing = True
        self._commit_due()

    def _commit_due(self, force: bool = False) -> None:
        """Commit what is due, group by group, as the only committer; then stop being it."""
        while True:
            with self.order_lock:
                batch = self._take_due(force)
                if batch is None:
                    self.committing = False
                    return
            if batch and self.error is None:
                try:
                    self.committer.commit(batch)
                except BaseException as exc:  # noqa: BLE001 - surfaced by check()
                    self.error = exc
            for record in batch:
                self.pending.discard(record.item.id)

    def _take_due(self, force: bool) -> list | None:
        """Take the run of consecutive ready records if it is due: when ``force``, when nothing else is
        being written, or once it holds COMMIT_GROUP; None when none is. Call with ``order_lock`` held."""
        run = 0
        while self.next_commit + run in self.ready:
            run += 1
        # put and not committed, the ready run included (the render loop counts a put just after making it,
        # so a record may be ready before it is counted: >=, not ==)
        outstanding = self.next_put - self.next_commit
        if run == 0 or not (force or run >= COMMIT_GROUP or run >= outstanding):
            return None
        batch = []
        for _ in range(run):
            record = self.ready.pop(self.next_commit)
            self.next_commit += 1
            if record is not None:
                batch.append(record)
        return batch
