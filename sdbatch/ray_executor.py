"""The Ray executor: render actors on a Ray cluster, writing in the driver as the local executor does.

Each actor loads the model once (one GPU each where there are GPUs) and renders whole
batches of items; the driver streams batches from the lazy plan into a ``ray.util.ActorPool``
with a bounded number in flight (back-pressure: the plan is never materialised), and runs
the writers, the manifest and the shards exactly as the local executor does, so an item
renders to the same pixels under either. Actors restart when their process dies and Ray
retries the batch they held, so a killed worker costs time, not items.
"""

from __future__ import annotations

import time

from .run import LocalExecutor, _record_failures

IN_FLIGHT_PER_WORKER = 2


class RenderActor:
    """Holds a Renderer (and so the loaded model) for the life of the actor process."""

    def __init__(self, models: dict, device: str, dtype: str, pad_batches_to: int | None, retries: int = 1,
                 threads: int | None = None):
        import torch

        from .plugins import load_registry
        from .render import Renderer

        if threads:  # CPU kernels split work by thread count: match the driver's, and so its pixels
            torch.set_num_threads(threads)
        self.renderer = Renderer(load_registry(), device, dtype, models, pad_batches_to=pad_batches_to)
        self.retries = retries

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


def _local_threads() -> int:
    """The intra-op threads a local run here would use (Ray sets workers to one by default)."""
    import torch

    return torch.get_num_threads()


class RayExecutor(LocalExecutor):
    """Like LocalExecutor, but batches render on a pool of Ray actors."""

    name = "ray"

    def __init__(self, job, registry, out_dir, workers: int | None = None, address: str | None = None,
                 gpus_per_worker: float | None = None, **kwargs):
        super().__init__(job, registry, out_dir, **kwargs)
        self.workers, self.address, self.gpus_per_worker = workers, address, gpus_per_worker
        self.actors: list = []

    def _start(self):
        import ray
        from ray.util import ActorPool

        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True)
        resources = ray.cluster_resources()
        gpus = self.gpus_per_worker if self.gpus_per_worker is not None else (1 if resources.get("GPU") else 0)
        workers = self.workers or max(1, int(resources.get("GPU", 0) // gpus) if gpus else
                                      int(resources.get("CPU", 1)))
        # Fractional CPUs: whole ones can starve Ray's own tasks on a small machine.
        actor_class = ray.remote(num_cpus=0.5 if not gpus else 1, num_gpus=gpus, max_restarts=-1,
                                 max_task_retries=-1)(RenderActor)
        device = self.device if self.device != "auto" else ("cuda" if gpus else "cpu")
        pad = self.batch_size if device.startswith("cuda") else None
        threads = self.job.spec.threads or _local_threads()
        self.actors = [actor_class.remote(self.job.plan.models, device, self.job.spec.dtype, pad, self.job.spec.retries,
                                          threads)
                       for _ in range(workers)]
        return ActorPool(self.actors)

    def _render_batches(self, batches, sink, summary) -> None:
        """Stream batches through the actor pool, at most a few per worker in flight."""
        pool = self._start()
        limit = IN_FLIGHT_PER_WORKER * len(self.actors)
        in_flight = 0
        for batch in batches:
            sink.check()
            while in_flight >= limit:
                self._collect(pool.get_next_unordered(), sink, summary)
                in_flight -= 1
            pool.submit(lambda actor, work: actor.render.remote(work), batch)
            in_flight += 1
        while in_flight:
            self._collect(pool.get_next_unordered(), sink, summary)
            in_flight -= 1

    def _collect(self, outcome, sink, summary) -> None:
        results, failures = outcome
        for item, message in failures:
            summary.failed += 1
            _record_failures(self.context.out.root, [item], RuntimeError(message))
            sink.progress.update(1, rendered=False)
        if results:
            summary.render_seconds += sum(r.seconds for r in results)
            sink.put(results)

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
