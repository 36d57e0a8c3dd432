"""The Ray executor: render actors on a Ray cluster; the workers write, the driver commits.

Each actor loads the model once (one GPU each where there are GPUs) and renders whole
batches of items; the driver streams batches from the lazy plan to the actors with a
bounded number in flight (back-pressure: the plan is never materialised). By default
(``write_on="workers"``) an actor also runs the writers on what it rendered, on a few
threads while it renders its next batch, straight into the output folder (which the
workers must see: one machine, or a shared filesystem), and returns small records (id,
files, sha256); the driver only appends manifest lines, so pixels never cross the network
and one driver core keeps up with a cluster. WebDataset shards are packed by the worker
that stages a shard's last sample. ``write_on="driver"`` (or a job with a writer not
declared ``parallel``) returns the pixels and writes in the driver, as the local executor
does. Either way an item renders to the same pixels and files as under the local executor.
Actors restart when their process dies and Ray retries the batches they held, so a killed
worker costs time, not items.
"""

from __future__ import annotations

import threading
import time

from .run import LocalExecutor, RunContext, _record_failures, make_writers
from .writing import Written, runs_in_parallel, write_item

IN_FLIGHT_PER_WORKER = 2


class RenderActor:
    """Holds a Renderer (and so the loaded model) for the life of the actor process.

    With ``writing`` (a ``WorkerWriting``) it also writes what it renders: ``render_and_write``
    calls may overlap, one rendering while others write.
    """

    def __init__(self, models: dict, device: str, dtype: str, pad_batches_to: int | None, retries: int = 1,
                 threads: int | None = None, writing=None):
        import torch

        from .plugins import load_registry

        if threads:  # CPU kernels split work by thread count: match the driver's, and so its pixels
            torch.set_num_threads(threads)
        self.registry = load_registry()
        self.renderer = self.make_renderer(self.registry, device, dtype, models, pad_batches_to)
        self.retries = retries
        self.render_lock = threading.Lock()  # one batch renders at a time; writing overlaps it
        self.writing = writing.start(self.registry) if writing is not None else None

    def make_renderer(self, registry, device: str, dtype: str, models: dict, pad_batches_to: int | None):
        """The renderer this actor uses (benchmarks put a stand-in here)."""
        from .render import Renderer

        return Renderer(registry, device, dtype, models, pad_batches_to=pad_batches_to)

    def render_and_write(self, batch: list) -> tuple[list, list, Exception | None]:
        """(records, render failures, an error that must stop the run): pixels stay in this process."""
        with self.render_lock:
            results, failures = self.render(batch)
        from .errors import SdbatchError

        try:
            return self.writing.write(results), failures, None
        except SdbatchError as exc:  # an output conflict: the driver stops the run with it
            return [], failures, exc

    def render(self, batch: list, attempt: int = 0) -> tuple[list, list]:
        """(results, failures): a failing batch is retried item by item so only bad items fail."""
        try:
            return self._render(batch), []
        except Exception as exc:  # noqa: BLE001 - reported per item to the driver
            if len(batch) == 1:
                if attempt < self.retries:
                    return self.render(batch, attempt + 1)
                return [], [(batch[0], f"{type(exc).__name__}: {exc}")]
        results, failures = [], []
        for item in batch:
            done, failed = self.render([item])
            results += done
            failures += failed
        return results, failures

    def _render(self, batch: list) -> list:
        began = time.monotonic()
        results = self.renderer.render(batch)
        for result in results:
            result.seconds = (time.monotonic() - began) / len(batch)
        return results

    def pid(self) -> int:
        import os

        return os.getpid()


class WorkerWriting:
    """What a worker needs to run the job's writers into the shared output folder (plain, picklable data)."""

    def __init__(self, job, root: str, job_name: str, versions: dict, threads: int):
        self.job, self.root, self.job_name, self.versions, self.threads = job, root, job_name, versions, threads

    def start(self, registry) -> WorkerWriting:
        from concurrent.futures import ThreadPoolExecutor

        from .output import OutputDir

        context = RunContext(self.job, OutputDir(self.root, worker=True), self.versions, self.job_name)
        self.writers = make_writers(self.job, context)
        self.entries_of = {writer.name: registry.require("writer", writer.name) for writer in self.writers}
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="sdbatch-worker-writer")
        return self

    def write(self, results: list) -> list[Written]:
        return list(self.pool.map(lambda result: write_item(self.writers, self.entries_of, result), results))


def _local_threads() -> int:
    """The intra-op threads a local run here would use (Ray sets workers to one by default)."""
    import torch

    return torch.get_num_threads()


class RayExecutor(LocalExecutor):
    """Like LocalExecutor, but batches render (and, by default, write) on Ray actors."""

    name = "ray"
    actor_class = RenderActor

    def __init__(self, job, registry, out_dir, workers: int | None = None, address: str | None = None,
                 gpus_per_worker: float | None = None, write_on: str = "workers", **kwargs):
        super().__init__(job, registry, out_dir, **kwargs)
        self.workers, self.address, self.gpus_per_worker = workers, address, gpus_per_worker
        self.write_on = write_on
        self.actors: list = []

    def _workers_write(self) -> bool:
        """Workers write unless asked not to or a writer must run in one place (not declared parallel)."""
        return self.write_on == "workers" and all(runs_in_parallel(cls) for cls, _options, _use in self.job.writers)

    def _start(self) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True)
        resources = ray.cluster_resources()
        gpus = self.gpus_per_worker if self.gpus_per_worker is not None else (1 if resources.get("GPU") else 0)
        workers = self.workers or max(1, int(resources.get("GPU", 0) // gpus) if gpus else
                                      int(resources.get("CPU", 1)))
        writing = None
        if self._workers_write():
            context = self.context
            threads = max(1, min(self.write_threads, int(resources.get("CPU", 1)) // workers))
            writing = WorkerWriting(self.job, str(context.out.root.resolve()), context.job_name, context.versions,
                                    threads)
        # Fractional CPUs: whole ones can starve Ray's own tasks on a small machine.
        actor_class = ray.remote(num_cpus=0.5 if not gpus else 1, num_gpus=gpus, max_restarts=-1,
                                 max_task_retries=-1,
                                 max_concurrency=IN_FLIGHT_PER_WORKER if writing else 1)(self.actor_class)
        device = self.device if self.device != "auto" else ("cuda" if gpus else "cpu")
        pad = self.batch_size if device.startswith("cuda") else None
        threads = self.job.spec.threads or _local_threads()
        self.actors = [actor_class.remote(self.job.plan.models, device, self.job.spec.dtype, pad, self.job.spec.retries,
                                          threads, writing)
                       for _ in range(workers)]

    def _render_batches(self, batches, sink, summary) -> None:
        """Stream batches to the least busy actor, at most a few per worker in flight."""
        import ray

        self._start()
        workers_write = self._workers_write()
        limit = IN_FLIGHT_PER_WORKER * len(self.actors)
        in_flight: dict = {}  # object ref -> actor
        load = {actor: 0 for actor in self.actors}

        def collect() -> None:
            """Wait for a batch, then take every one done by now: one manifest append (one fsync) for all."""
            ray.wait(list(in_flight), num_returns=1)
            ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
            for ref in ready:
                load[in_flight.pop(ref)] -= 1
            self._collect(ray.get(ready), sink, summary, workers_write)

        for batch in batches:
            sink.check()
            while len(in_flight) >= limit:
                collect()
            actor = min(self.actors, key=load.__getitem__)
            method = actor.render_and_write if workers_write else actor.render
            in_flight[method.remote(batch)] = actor
            load[actor] += 1
        while in_flight:
            collect()
        if workers_write:  # what killed workers left under temporary names (every actor is idle now)
            self.context.out.remove_temporaries()

    def _collect(self, outcomes: list, sink, summary, workers_write: bool) -> None:
        """Record the batches' failures, then commit their records (or write their results here)."""
        done = []
        for results, failures, *error in outcomes:
            for item, message in failures:
                summary.failed += 1
                _record_failures(self.context.out.root, [item], message, "")
                sink.progress.update(1)
            if error and error[0] is not None:
                raise error[0]
            summary.render_seconds += sum(r.seconds for r in results)
            done += results
        if workers_write:
            sink.committer.commit(done)  # Written records, each batch in the order it was planned
        elif done:
            sink.put(done)

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
