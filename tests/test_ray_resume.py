"""Kill the driver of a Ray run (SIGKILL, mid-job) and run the same command again.

The driver starts its own local Ray cluster in a subprocess, as `sdbatch run --executor ray`
does on a laptop. The rerun must finish only what is missing: every item exactly once
in the manifest, the WebDataset shards and Parquet files complete and readable, and
images byte-identical to a local run of the same items. A separate module from
tests/test_ray.py, whose in-process cluster must not be the one the subprocess joins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

pytestmark = pytest.mark.slow


def test_killing_the_ray_driver_then_rerunning_finishes_each_item_once(write_job, tiny_model, kill_run_after,
                                                                        tmp_path):
    pytest.importorskip("ray")
    pytest.importorskip("webdataset")
    import pyarrow.parquet as pq

    job = write_job(f"""
        model: {tiny_model}
        steps: 3
        batch_size: 2
        prompt: "a {{red|blue}} circle"
        sweep: {{seed: {{start: 0, count: 8}}}}
        outputs: [png, {{webdataset: {{shard_size: 4}}}}]
    """)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    done = kill_run_after(job, out, finished=3, timeout=240, args=["--executor", "ray", "--workers", "1"], env=env)
    assert 3 <= done < 16
    from sdbatch.ray_executor import SESSIONS, _processes_of

    killed_session = (out / SESSIONS).read_text().split()  # the cluster the killed driver started
    assert len(killed_session) == 1
    rerun = subprocess.run([sys.executable, "-m", "sdbatch", "run", str(job), "-o", str(out), "-q",
                            "--executor", "ray", "--workers", "1"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]

    ids = [json.loads(line)["id"] for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
    assert len(set(ids)) == 16  # every item finished; a line twice would only repeat the same id
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rendered"] == 16 - done and summary["already_done"] == done
    keys = []
    for shard in range(4):
        with tarfile.open(out / "dataset" / f"{shard:05d}.tar") as tar:
            keys += sorted({name.split(".")[0] for name in tar.getnames()})
        assert pq.read_table(out / "dataset" / f"{shard:05d}.parquet").num_rows == 4
        assert (out / "dataset" / f"{shard:05d}_stats.json").is_file()
    assert len(keys) == len(set(keys)) == 16
    # The workers wrote the files: nothing partial or staged is left behind by the killed run.
    assert not [p for p in out.rglob("*") if p.is_file() and ("sdbatch-tmp" in p.name or ".dataset-staging" in p.parts)]

    local = tmp_path / "local"
    assert subprocess.run([sys.executable, "-m", "sdbatch", "run", str(job), "-o", str(local), "-q"], env=env,
                          timeout=300).returncode == 0
    for shard in range(4):
        name = f"dataset/{shard:05d}.tar"
        assert (out / name).read_bytes() == (local / name).read_bytes()
    # Nothing of the killed driver's cluster outlives the rerun: Ray's reaper takes the raylet and
    # GCS down with the driver, the rerun ends what it leaves (ray::DashboardAgent, ray::RuntimeEnvAgent).
    # Scoped to that cluster's session: other Ray clusters on a shared machine are not its business.
    assert _processes_of(killed_session[0]) == {}
    assert not (out / SESSIONS).exists()  # the rerun stopped its own cluster and noted nothing left
