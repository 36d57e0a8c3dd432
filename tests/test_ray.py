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


def test_ray_and_local_executors_write_identical_outputs(ray_cluster, write_job, tiny_model, registry, tmp_path):
    from sdbatch.job import load_job
    from sdbatch.ray_executor import RayExecutor
    from sdbatch.run import LocalExecutor

    job = load_job(_job(write_job, tiny_model, 3), registry)
    local = LocalExecutor(job, registry, tmp_path / "local", quiet=True).run()
    distributed = RayExecutor(job, registry, tmp_path / "ray", workers=2, quiet=True).run()
    assert local.rendered == distributed.rendered == 6
    assert _pngs(tmp_path / "local") == _pngs(tmp_path / "ray") and len(_pngs(tmp_path / "ray")) == 6
    for name in ("00000.tar", "00001.tar", "00000.parquet"):
        assert (tmp_path / "local" / "dataset" / name).read_bytes() == (tmp_path / "ray" / "dataset" / name).read_bytes()


def test_a_killed_worker_loses_no_item_and_duplicates_none(ray_cluster, write_job, tiny_model, registry, tmp_path):
    from sdbatch.job import load_job
    from sdbatch.ray_executor import RayExecutor

    job = load_job(_job(write_job, tiny_model, 8), registry)
    out = tmp_path / "out"
    executor = RayExecutor(job, registry, out, workers=2, quiet=True)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("summary", executor.run()))
    thread.start()
    manifest, deadline = out / "manifest.jsonl", time.monotonic() + 180
    while time.monotonic() < deadline and not (manifest.is_file() and len(manifest.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    victim = ray_cluster.get(executor.actors[0].pid.remote())
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    summary = outcome["summary"]
    ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines()]
    assert summary.failed == 0 and summary.rendered == 16
    assert len(ids) == len(set(ids)) == 16 == len({item.id for item in job.plan})
    assert len(list((out / "dataset").glob("*_stats.json"))) == 4


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
        outputs: [png]
    """), registry)
    LocalExecutor(job, registry, tmp_path / "local", quiet=True).run()
    RayExecutor(job, registry, tmp_path / "ray", workers=2, quiet=True).run()
    assert _pngs(tmp_path / "local") == _pngs(tmp_path / "ray") and len(_pngs(tmp_path / "ray")) == 4
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
