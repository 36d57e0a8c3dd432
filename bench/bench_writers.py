"""Throughput of sdbatch's output path alone: images/s per format, local and Ray, and driver CPU per item.

    .venv/bin/python bench/bench_writers.py [--items 48] [--sizes 512,1024] [--formats png,jpeg,webp,webdataset]
    .venv/bin/python bench/bench_writers.py --scaling [--gpu-rate 6] [--items 96]

A renderer that costs nothing returns pre-made images (a smooth picture with a little
noise, 512x512 and 1024x1024), so everything measured is the real output path: the
writers' encoding and metadata, hashing, atomic writes, the manifest and WebDataset
shard packing. Runs go one after another in this process.

Default mode: for each format and size, the local executor with 1, 2 and all write
threads, then (Ray started only now: its daemons would take CPU from the local runs) the
Ray executor with 1, 2 and all workers writing (one thread each).
Local scaling is rate(n) / (n x rate(1)); the target is >= 0.8. Each local count runs
--repeat times (default 3), the counts alternated, and the median run is reported: on a
shared machine single runs of the fast formats (JPEG at 512: ~2 ms an item) vary by 30%. cpu/wall (this process's
CPU seconds per wall second) shows whether the threads did run at once: on a machine
shared with other busy processes, scaling measures the cores left free, cpu/wall the GIL. Under Ray the driver's
CPU time per item (process time of this process, all its threads, from the first
finished batch to the end of the run: manifest, shards left to finish, summary) is the
cost one driver pays per item of a whole cluster; the target is <= 1 ms. The one-thread local rate is
what today's single writer thread managed.

--scaling: a simulated GPU renderer (each worker sleeps for batch/gpu-rate seconds, no
CPU) with 1, 2, 4 and 8 Ray workers, PNG at 512x512, workers writing against the old
design (the driver writes on one thread) in the same run. The rate is measured from the
first finished batch, so actor start-up is left out.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from sdbatch.ray_executor import RayExecutor, RenderActor
from sdbatch.run import LocalExecutor
from sdbatch.writing import default_threads

FORMATS = {"png": "[png]", "jpeg": "[jpeg]", "webp": "[webp]", "webdataset": "[{webdataset: {shard_size: 16}}]"}


def premade(size: int):
    """A smooth picture with a little noise: compresses about as generated images do."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    pixels = np.stack([128 + 100 * np.sin(6 * x + 3 * y), 128 + 100 * np.cos(20 * x * y), 255 * x * y], -1)
    pixels += np.random.default_rng(0).normal(0, 2, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


class PremadeRenderer:
    """Stands in for the Renderer: the same pre-made image for every item, after an optional GPU-like wait."""

    def __init__(self, size: int, rate: float | None = None):
        self.image, self.rate = premade(size), rate
        self.cache = type("Cache", (), {"loads": 0})()

    def render(self, items: list) -> list:
        from sdbatch.render import Rendered

        if self.rate:
            time.sleep(len(items) / self.rate)  # a GPU busy for this long; this process's CPU is free
        return [Rendered(item, self.image, "premade") for item in items]


class PremadeLocal(LocalExecutor):
    size = 512

    def _render_batches(self, batches, sink, summary) -> None:
        renderer = PremadeRenderer(self.size)
        for batch in batches:
            sink.check()
            self._render(renderer, batch, sink, summary)


class PremadeActor(RenderActor):
    size, rate = 512, None  # set per run on a subclass, which Ray ships to the workers by value

    def make_renderer(self, registry, device, dtype, models, pad_batches_to, batch_invariant=True):
        return PremadeRenderer(self.size, self.rate)


class PremadeRay(RayExecutor):
    """The Ray executor with pre-made images; its rate counts from the first finished batch."""

    actor_class = PremadeActor
    started = cpu_started = None
    after_first = 0

    def _collect(self, outcomes: list, sink, summary, workers_write: bool) -> None:
        if self.started is None:
            self.started, self.cpu_started = time.monotonic(), time.process_time()
        else:
            self.after_first += sum(len(outcome[0]) for outcome in outcomes)
        super()._collect(outcomes, sink, summary, workers_write)


def write_job(folder: Path, size: int, items: int, outputs: str, batch: int = 4) -> Path:
    path = folder / f"bench-{size}-{len(list(folder.iterdir()))}.yaml"
    path.write_text(f"model: sdbatch-tiny\nwidth: {size}\nheight: {size}\nbatch_size: {batch}\n"
                    f'prompt: "a {{red|blue|green}} {{circle|square}} on a plain background"\n'
                    f"sweep: {{seed: {{start: 0, count: {items}}}}}\noutputs: {outputs}\n")
    return path


def run_local(job_path: Path, out: Path, size: int, threads: int) -> tuple[float, float]:
    """(images/s, this process's CPU seconds per wall second: above 1, threads ran at once)."""
    from sdbatch.job import load_job
    from sdbatch.plugins import load_registry

    registry = load_registry()
    job = load_job(job_path, registry)
    executor = PremadeLocal(job, registry, out, quiet=True, write_threads=threads)
    executor.size = size
    began, cpu = time.perf_counter(), time.process_time()
    summary = executor.run()
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    assert summary.rendered == len(job.plan) and summary.failed == 0
    return summary.rendered / wall, cpu / wall


def run_ray(job_path: Path, out: Path, size: int, workers: int, write_on: str = "workers",
            rate: float | None = None) -> tuple[float, float]:
    """(images/s, driver CPU ms per item), both from the first finished batch on (start-up left out)."""
    from sdbatch.job import load_job
    from sdbatch.plugins import load_registry

    registry = load_registry()
    job = load_job(job_path, registry)
    executor = PremadeRay(job, registry, out, workers=workers, quiet=True, write_threads=1, write_on=write_on)
    executor.actor_class = type("Premade", (PremadeActor,), {"size": size, "rate": rate})
    summary = executor.run()
    ended, cpu = time.monotonic(), time.process_time()
    executor.shutdown()
    assert summary.rendered == len(job.plan) and summary.failed == 0
    return (executor.after_first / (ended - executor.started),
            1000 * (cpu - executor.cpu_started) / executor.after_first)


def start_ray(cpus: int) -> None:
    import ray

    # Ray runs workers at nice 15 and the driver at 0: on a machine shared with other busy
    # processes that starves the workers and flatters the driver-writes design. Equal here.
    os.environ["RAY_worker_niceness"] = "0"
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})


def formats_table(args, work: Path) -> None:
    cores = default_threads()
    counts = sorted({1, 2, cores})
    print(f"machine: {cores} cores usable; items per run: {args.items} at 512, a quarter at 1024, x8 for jpeg "
          "(it encodes ~10x faster)")
    print(f"{'format':11s} {'size':>5s} {'run':12s} {'images/s':>9s} {'scaling':>8s} {'driver ms/item':>15s} "
          f"{'cpu/wall':>8s}")
    jobs, one = {}, {}
    for size in args.sizes:  # local runs first: Ray's daemons, once started, take CPU from local threads
        for name in args.formats:
            items = max(8, args.items * (8 if name == "jpeg" else 1) // (4 if size > 512 else 1))
            job = jobs[name, size] = write_job(work, size, items, FORMATS[name])
            runs = {threads: [] for threads in counts}
            for repeat in range(args.repeat):  # alternated, so a busy spell of the machine hits every count
                for threads in counts:
                    runs[threads].append(run_local(job, work / f"local-{name}-{size}-{threads}-{repeat}", size,
                                                   threads))
            for threads in counts:
                rate, busy = sorted(runs[threads])[len(runs[threads]) // 2]  # the median run by rate
                one[name, size] = one.get((name, size)) or rate
                print(f"{name:11s} {size:5d} {'local x' + str(threads):12s} {rate:9.2f} "
                      f"{rate / (threads * one[name, size]):8.2f} {'':15s} {busy:8.2f}")
    start_ray(cores)
    for (name, size), job in jobs.items():
        for workers in counts:
            rate, cpu_ms = run_ray(job, work / f"ray-{name}-{size}-{workers}", size, workers)
            print(f"{name:11s} {size:5d} {'ray x' + str(workers):12s} {rate:9.2f} "
                  f"{rate / (workers * one[name, size]):8.2f} {cpu_ms:15.2f}")
    # At a few images/s the driver's CPU is mostly Ray's own background threads, not items:
    # its per-item cost shows at a rate high enough to need a cluster (tiny JPEGs, batch 16).
    job = write_job(work, 64, args.ceiling_items, FORMATS["jpeg"], batch=16)
    rate, cpu_ms = run_ray(job, work / "ceiling", 64, 2)
    print(f"driver ceiling: {args.ceiling_items} items (64x64 jpeg, batch 16, 2 workers) at {rate:.0f} images/s: "
          f"{cpu_ms:.3f} ms driver CPU per item = a ceiling of {1000 / cpu_ms:,.0f} items/s")


def scaling_table(args, work: Path) -> None:
    size, rate = 512, args.gpu_rate
    start_ray(4)  # logical CPUs: 8 actors at 0.5 CPU each; they sleep, so this oversubscribes nothing
    print(f"simulated GPU: {rate:g} images/s per worker, PNG {size}x{size}, max({args.items}, 32 x workers) items, "
          f"{default_threads()} cores; 'driver' = the driver writes on one thread (the old design)")
    print(f"{'workers':>7s} {'ideal':>7s} {'workers write':>14s} {'driver writes':>14s} {'ratio':>6s} "
          f"{'driver ms/item':>15s}")
    for workers in (1, 2, 4, 8):
        job = write_job(work, size, max(args.items, 32 * workers), FORMATS["png"])  # many more than in flight
        new, cpu_new = run_ray(job, work / f"scale-w-{workers}", size, workers, "workers", rate)
        old, cpu_old = run_ray(job, work / f"scale-d-{workers}", size, workers, "driver", rate)
        print(f"{workers:7d} {workers * rate:7.1f} {new:14.2f} {old:14.2f} {new / old:6.2f} "
              f"{cpu_new:7.2f} vs {cpu_old:5.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=48, help="items per run (PNG at 512x512)")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--repeat", type=int, default=3,
                        help="local runs per thread count, alternated; the median is reported")
    parser.add_argument("--ceiling-items", type=int, default=2000, help="items of the driver-ceiling run")
    parser.add_argument("--scaling", action="store_true", help="the simulated-GPU scaling run instead")
    parser.add_argument("--gpu-rate", type=float, default=6.0, help="simulated images/s per worker")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.formats = args.formats.split(",")
    work = Path(tempfile.mkdtemp(prefix="sdbatch-bench-writers-"))
    (scaling_table if args.scaling else formats_table)(args, work)
    print(f"outputs in {work}")


if __name__ == "__main__":
    sys.exit(main())
