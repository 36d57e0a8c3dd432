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

import os
import signal
import threading
import time
from pathlib import Path

from .output import atomic_write
from .run import LocalExecutor, RunContext, _record_failures, make_writers
from .writing import Written, runs_in_parallel, write_item

IN_FLIGHT_PER_WORKER = 2


class RenderActor:
    """Holds a Renderer (and so the loaded model) for the life of the actor process.

    With ``writing`` (a ``WorkerWriting``) it also writes what it renders: ``render_and_write``
    calls may overlap, one rendering while others write.
    """

    def __init__(self, models: dict, device: str, dtype: str, pad_batches_to: int | None, retries: int = 1,
                 threads: int | None = None, batch_invariant: bool = True, writing=None):
        import torch

        from .plugins import load_registry

        if threads:  # CPU kernels split work by thread count: match the driver's, and so its pixels
            torch.set_num_threads(threads)
        self.registry = load_registry()
        self.renderer = self.make_renderer(self.registry, device, dtype, models, pad_batches_to, batch_invariant)
        self.retries = retries
        self.render_lock = threading.Lock()  # one batch renders at a time; writing overlaps it
        self.writing = writing.start(self.registry) if writing is not None else None

    def make_renderer(self, registry, device: str, dtype: str, models: dict, pad_batches_to: int | None,
                      batch_invariant: bool = True):
        """The renderer this actor uses (benchmarks put a stand-in here)."""
        from .render import Renderer

        return Renderer(registry, device, dtype, models, pad_batches_to=pad_batches_to,
                        batch_invariant=batch_invariant)

    def render_and_write(self, batch: list) -> tuple[list, list, Exception | None]:
        """(records, render failures, an error that must stop the run): pixels stay in this process."""
        results, failures = self.render(batch)
        from .errors import SdbatchError

        try:
            return self.writing.write(results), failures, None
        except SdbatchError as exc:  # an output conflict: the driver stops the run with it
            return [], failures, exc

    def render(self, batch: list) -> tuple[list, list]:
        """(results, failures), one batch at a time (calls may overlap on an actor that writes)."""
        with self.render_lock:
            return self._render_or_split(batch)

    def _render_or_split(self, batch: list, attempt: int = 0) -> tuple[list, list]:
        """(results, failures): a failing batch is retried item by item so only bad items fail."""
        try:
            return self._render(batch), []
        except Exception as exc:  # noqa: BLE001 - reported per item to the driver
            if len(batch) == 1:
                if attempt < self.retries:
                    return self._render_or_split(batch, attempt + 1)
                return [], [(batch[0], f"{type(exc).__name__}: {exc}")]
        results, failures = [], []
        for item in batch:
            done, failed = self._render_or_split([item])
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
        return os.getpid()


class WorkerWriting:
    """What a worker needs to run the job's writers into the shared output folder (plain, picklable data)."""

    def __init__(self, job, root: str, job_name: str, versions: dict, threads: int):
        self.job, self.root, self.job_name, self.versions, self.threads = job, root, job_name, versions, threads

    def start(self, registry) -> WorkerWriting:
        from concurrent.futures import ThreadPoolExecutor

        from .output import OutputDir

        self.out = OutputDir(self.root, worker=True)
        context = RunContext(self.job, self.out, self.versions, self.job_name)
        self.writers = make_writers(self.job, context)
        self.entries_of = {writer.name: registry.require("writer", writer.name) for writer in self.writers}
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="sdbatch-worker-writer")
        return self

    def write(self, results: list) -> list[Written]:
        written = list(self.pool.map(lambda result: write_item(self.writers, self.entries_of, result), results))
        self.out.make_durable()  # durable before the driver commits their manifest lines
        return written


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
        self._started: str | None = None  # the session name of a local cluster this run started

    def _render_now(self, batches: list) -> list:
        """The timing pre-pass renders on the workers too (the driver may have no GPU), results in order."""
        from .errors import SdbatchError

        import ray

        actors = self._start()
        refs = [actors[n % len(actors)].render.remote(batch) for n, batch in enumerate(batches)]
        results = []
        for done, failures in ray.get(refs):
            if failures:
                raise SdbatchError(f"the timing pre-pass failed: {failures[0][1]}")
            results += done
        return results

    def _workers_write(self) -> bool:
        """Workers write unless asked not to or a writer must run in one place (not declared parallel)."""
        return self.write_on == "workers" and all(runs_in_parallel(cls) for cls, _options, _use in self.job.writers)

    def _start(self) -> list:
        """The render actors, started once per run (the timing pre-pass may start them first)."""
        if not self.actors:
            self.actors = self._start_actors()
        return self.actors

    def _start_actors(self) -> list:
        import ray

        if not ray.is_initialized():
            if self.address is None:  # a local cluster of our own: tidy what a killed run left, note ours
                reap_sessions(self.context.out.root)
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True)
            self._started = _session_name() if self.address is None else None
            if self._started:
                _note_session(self.context.out.root, self._started)
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
        return [actor_class.remote(self.job.plan.models, device, self.job.spec.dtype, pad, self.job.spec.retries,
                                          threads, self.job.spec.batch_invariant, writing)
                for _ in range(workers)]

    def _render_batches(self, batches, sink, summary) -> None:
        """Stream batches to the actors, then stop them (and a cluster this run started)."""
        self._start()
        try:
            self._stream(batches, sink, summary)
        finally:
            self.shutdown()

    def _stream(self, batches, sink, summary) -> None:
        """Send each batch to the least busy actor, at most a few per worker in flight."""
        import ray

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
                sink.progress.update(1, rendered=False)
            if error and error[0] is not None:
                raise error[0]
            summary.render_seconds += sum(r.seconds for r in results)
            done += results
        if workers_write:
            sink.committer.commit(done)  # Written records, each batch in the order it was planned
        elif done:
            sink.put(done)

    def shutdown(self) -> None:
        """Stop the actors, and the local cluster if this run started it (its agents too)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._started:
            ray.shutdown()
            _note_session(self.context.out.root, self._started, remove=True)
            self._started = None


# -- clusters a killed driver left behind ------------------------------------------------
# A driver killed with SIGKILL takes its raylet and GCS down (Ray's reaper), but the
# per-node agents (ray::DashboardAgent, ray::RuntimeEnvAgent) outlive it. Each run notes
# the session of the local cluster it starts in the output folder; the next run there
# ends what is left of a noted session whose raylet and GCS are gone, and nothing else.
SESSIONS = ".sdbatch-ray-sessions"


def _session_name() -> str | None:
    try:
        from ray._private import worker

        return worker._global_node.session_name
    except (ImportError, AttributeError):
        return None


def _note_session(root: Path, name: str, remove: bool = False) -> None:
    path = root / SESSIONS
    names = set(path.read_text().split()) if path.is_file() else set()
    names = names - {name} if remove else names | {name}
    if names:
        atomic_write(path, "\n".join(sorted(names)).encode())
    elif path.exists():
        path.unlink()


def reap_sessions(root: Path) -> list[int]:
    """Kill the leftover processes of noted sessions whose cluster is gone; the pids killed."""
    path = root / SESSIONS
    if not path.is_file() or not os.path.isdir("/proc"):
        return []
    killed, alive = [], set()
    for name in path.read_text().split():
        processes = _processes_of(name)
        if any(b"raylet" in cmd or b"gcs_server" in cmd for cmd in processes.values()):
            alive.add(name)  # a cluster still running: not ours to end
            continue
        for pid in processes:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    if alive:
        atomic_write(path, "\n".join(sorted(alive)).encode())
    else:
        path.unlink()
    return killed


def _processes_of(session: str) -> dict[int, bytes]:
    """pid -> command line of this user's processes whose command line names ``session``."""
    found, needle = {}, session.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if needle in cmdline:
            found[int(entry)] = cmdline
    return found
