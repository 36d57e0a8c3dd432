"""The Ray executor on a real local Ray cluster: same pixels as local, and a killed worker loses nothing."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def _job(write_job, tiny_model, count: int):
    return write_job(f"""
        model: {tiny_model}
        steps: 3
        batch_size: 2
        prompt: "a {{red|blue}} circle"
        sweep: {{seed: {{start: 0, count: {count}}}}}
        outputs: [png, {{webdataset: {{shard_size: 4}}}}]
    """)


def _pngs(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))
            if ".dataset-staging" not in p.parts}


def _outputs(out):
    """Every file a run leaves (shards included), and the manifest's items and files without timings."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.name not in ("manifest.jsonl", "summary.json")}
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return files, sorted(json.dumps([r["id"], r["files"], r["item"]], sort_keys=True) for r in lines)


def test_local_parallel_and_ray_workers_write_identical_outputs(ray_cluster, write_job, tiny_model, registry,
                                                                tmp_path):
    from sdbatch.job import load_job
    from sdbatch.ray_executor import RayExecutor
    from sdbatch.run import LocalExecutor

    job = load_job(_job(write_job, tiny_model, 3), registry)
    local = LocalExecutor(job, registry, tmp_path / "local", quiet=True, write_threads=1).run()
    parallel = LocalExecutor(job, registry, tmp_path / "parallel", quiet=True, write_threads=4).run()
    executor = RayExecutor(job, registry, tmp_path / "ray", workers=2, quiet=True)
    assert executor._workers_write()
    distributed = executor.run()
    assert local.rendered == parallel.rendered == distributed.rendered == 6
    files, manifest = _outputs(tmp_path / "local")
    assert {"dataset/00000.tar", "dataset/00001.tar", "dataset/00001_stats.json"} <= set(files)
    assert len(_pngs(tmp_path / "local")) == 6 and not any(".dataset-staging" in name for name in files)
    assert _outputs(tmp_path / "parallel") == (files, manifest)
    assert _outputs(tmp_path / "ray") == (files, manifest)


def test_a_worker_killed_while_writing_loses_no_item_and_duplicates_none(ray_cluster, write_job, tiny_model,
                                                                         registry, tmp_path):
    import tarfile

    from sdbatch.job import load_job
    from sdbatch.ray_executor import RayExecutor

    job = load_job(_job(write_job, tiny_model, 8), registry)
    out = tmp_path / "out"
    executor = RayExecutor(job, registry, out, workers=2, quiet=True)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("summary", executor.run()))
    thread.start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not any(out.rglob("*.png")):  # the workers are writing
        time.sleep(0.01)
    victim = ray_cluster.get(executor.actors[0].pid.remote())
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    summary = outcome["summary"]
    ids = [json.loads(line)["id"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert summary.failed == 0 and summary.rendered == 16
    assert len(ids) == len(set(ids)) == 16 == len({item.id for item in job.plan})
    assert len(list((out / "dataset").glob("*_stats.json"))) == 4
    for shard in range(4):
        with tarfile.open(out / "dataset" / f"{shard:05d}.tar") as tar:
            assert sorted(tar.getnames()) == sorted(f"{i:09d}.{ext}" for i in range(4 * shard, 4 * shard + 4)
                                                    for ext in ("png", "txt", "json"))
    assert len(_pngs(out)) == 16
    leftovers = [p for p in out.rglob("*") if p.is_file() and ("sdbatch-tmp" in p.name or ".dataset-staging" in p.parts)]
    assert not leftovers  # no partial file, no sample staged twice


def test_controlnet_and_img2img_items_match_between_ray_and_local(ray_cluster, write_job, tiny_model, registry,
                                                                  tmp_path):
    from PIL import Image

    from sdbatch.job import load_job
    from sdbatch.ray_executor import RayExecutor
    from sdbatch.run import LocalExecutor
    from sdbatch.testmodel import build_tiny_controlnet
    from sdbatch.tiny import scenes

    net = build_tiny_controlnet(tiny_model, tmp_path / "cn", seed=1)
    for i in range(2):
        scenes.make_scene(i).pil().save(tmp_path / f"scene{i}.png")
    job = load_job(write_job(f"""
        model: {tiny_model}
        steps: 4
        batch_size: 2
        conditioners:
          - text
          - canny: {{image: {tmp_path / 'scene1.png'}, controlnet: {net}}}
          - img2img: {{image: {tmp_path / 'scene0.png'}, strength: 0.7}}
        sweep: {{canny.scale: [0.5, 1.0], seed: [1, 2]}}
        outputs: [png, control_maps]
    """), registry)
    LocalExecutor(job, registry, tmp_path / "local", quiet=True).run()
    executor = RayExecutor(job, registry, tmp_path / "ray", workers=2, quiet=True)
    assert not executor._workers_write()  # control_maps is not declared parallel: the driver writes
    executor.run()
    assert _pngs(tmp_path / "local") == _pngs(tmp_path / "ray") and len(_pngs(tmp_path / "ray")) == 5
    assert Image.open(next((tmp_path / "ray").rglob("*.png"))).size == (64, 64)


def test_even_timed_animation_frames_match_between_ray_and_local(ray_cluster, write_job, tiny_model, registry,
                                                                 tmp_path):
    from sdbatch.job import load_job
    from sdbatch.ray_executor import RayExecutor
    from sdbatch.run import LocalExecutor

    path = write_job(f"""
        model: {tiny_model}
        sampler: DDIM
        steps: 4
        batch_size: 3
        animation:
          keyframes: {{0: {{prompt: "a red circle", seed: 1}}, 6: {{prompt: "a blue square", seed: 2}}}}
          interpolate: {{timing: even}}
        outputs: [frames]
    """)
    LocalExecutor(load_job(path, registry), registry, tmp_path / "local", quiet=True).run()
    RayExecutor(load_job(path, registry), registry, tmp_path / "ray", workers=2, quiet=True).run()
    curves = lambda out: {key: (curve["t"], curve["change"])  # noqa: E731 - what the plan reads (not seconds)
                          for key, curve in json.loads((tmp_path / out / "timing.json").read_text())["segments"].items()}
    assert curves("local") == curves("ray") and len(curves("ray")) == 1
    assert _pngs(tmp_path / "local") == _pngs(tmp_path / "ray") and len(_pngs(tmp_path / "ray")) == 7


def test_ray_workers_rebuild_a_short_shard_and_repack_another_shard_size(ray_cluster, write_job, tiny_model,
                                                                          registry, tmp_path):
    """A local run stops mid-shard (shards of 4); a Ray run with shards of 3 re-packs it and renders the rest."""
    from sdbatch.job import load_job
    from sdbatch.ray_executor import RayExecutor
    from sdbatch.run import LocalExecutor

    def stats(out):
        return [json.loads(p.read_text()) for p in sorted((out / "dataset").glob("*_stats.json"))]

    path = _job(write_job, tiny_model, 4)
    (tmp_path / "three").mkdir()
    smaller = tmp_path / "three" / path.name  # the same job name, shards of 3
    smaller.write_text(path.read_text().replace("shard_size: 4", "shard_size: 3"))
    four, three = load_job(path, registry), load_job(smaller, registry)
    out = tmp_path / "out"
    LocalExecutor(four, registry, out, quiet=True, limit=6).run()
    assert [(s["shard"], s["complete"], s["successes"]) for s in stats(out)] == [(0, True, 4), (1, False, 2)]
    executor = RayExecutor(three, registry, out, workers=2, quiet=True)
    assert executor._workers_write()
    summary = executor.run()
    assert (summary.rendered, summary.already_done) == (2, 6)  # nothing rendered again
    assert [(s["shard"], s["shard_size"], s["complete"], s["successes"]) for s in stats(out)] == [
        (0, 3, True, 3), (1, 3, True, 3), (2, 3, True, 2)]
    LocalExecutor(three, registry, tmp_path / "fresh", quiet=True).run()
    shards = {p.name: p.read_bytes() for p in sorted((tmp_path / "fresh" / "dataset").iterdir())}
    assert {p.name: p.read_bytes() for p in sorted((out / "dataset").iterdir())} == shards  # byte-identical
    assert not any((out / ".dataset-staging").rglob("*.*")) and not [p for p in out.rglob("*sdbatch-tmp*")]
