"""Datasets: WebDataset shards + Parquet per shard, resumable by shard, through fsspec."""

from __future__ import annotations

import glob
import hashlib
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _dataset_job(write_job, tiny_model, extra: str = "", count: int = 3, shard_size: int = 5):
    return write_job(f"""
        model: {tiny_model}
        steps: 2
        batch_size: 4
        prompt: "a {{red|blue}} {{circle|square}}"
        sweep: {{seed: {{start: 0, count: {count}}}}}
        outputs: [{{webdataset: {{shard_size: {shard_size}{extra}}}}}]
    """)


def _shards(folder) -> dict:
    return {p.rsplit("/", 1)[-1]: open(p, "rb").read() for p in sorted(glob.glob(f"{folder}/*"))}


def test_shards_read_back_with_webdataset_and_pyarrow(write_job, tiny_model, tmp_path, capsys):
    import pyarrow.parquet as pq
    import webdataset as wds

    from sdbatch.cli import main

    out = tmp_path / "out"
    assert main(["run", str(_dataset_job(write_job, tiny_model)), "-o", str(out), "-q"]) == 0
    tars = sorted(glob.glob(f"{out}/dataset/*.tar"))
    assert [t.rsplit("/", 1)[-1] for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]  # 12 items, shards of 5
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert len(samples) == 12 and [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(12)]
    table = pq.read_table(sorted(glob.glob(f"{out}/dataset/*.parquet"))).to_pylist()
    assert len(table) == 12 and {row["status"] for row in table} == {"ok"}
    for sample, row in zip(samples, table):
        record = json.loads(sample["json"])
        assert sample["txt"].decode() == row["prompt"] == record["prompt"]
        assert hashlib.sha256(sample["png"]).hexdigest() == row["sha256"]
        assert row["index"] // 5 == row["shard"] and record["id"] == row["id"]
    stats = json.loads((out / "dataset" / "00002_stats.json").read_text())
    assert stats == {"shard": 2, "shard_size": 5, "complete": True, "count": 2, "successes": 2, "failed": 0}
    assert not (out / ".dataset-staging").exists() or not any((out / ".dataset-staging").rglob("*.png"))

    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "12/12 done" in text and "shards: 3/3" in text


def test_killed_dataset_run_resumes_to_identical_shards(write_job, tiny_model, tmp_path, kill_run_after):
    job = _dataset_job(write_job, tiny_model, count=4)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    run = [sys.executable, "-m", "sdbatch", "run", str(job), "-q", "-o"]
    assert subprocess.run(run + [str(clean)], capture_output=True).returncode == 0
    kill_run_after(job, killed, finished=7)
    result = subprocess.run(run + [str(killed)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert _shards(killed / "dataset") == _shards(clean / "dataset")  # byte-identical tar, parquet, stats
    assert len(_shards(clean / "dataset")) == 4 * 3
    again = subprocess.run(run + [str(killed)], capture_output=True, text=True)
    summary = json.loads((killed / "summary.json").read_text())
    assert again.returncode == 0 and summary["rendered"] == 0 and summary["already_done"] == 16


def test_shards_go_through_fsspec(write_job, tiny_model, tmp_path):
    import fsspec
    import webdataset as wds

    from sdbatch.cli import main

    job = _dataset_job(write_job, tiny_model, extra=", url: 'memory://sdbatch-test/set'", count=1)
    assert main(["run", str(job), "-o", str(tmp_path / "out"), "-q"]) == 0
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/sdbatch-test/set", detail=False))
    assert names == ["00000.parquet", "00000.tar", "00000_stats.json"]
    with fs.open("/sdbatch-test/set/00000.tar", "rb") as handle:
        (tmp_path / "copy.tar").write_bytes(handle.read())
    assert len(list(wds.WebDataset([str(tmp_path / "copy.tar")], shardshuffle=False))) == 4


def _samples(folder) -> dict:
    """key -> (png sha256, stats-free record) over every tar in the folder."""
    import webdataset as wds

    tars = sorted(glob.glob(f"{folder}/*.tar"))
    return {s["__key__"]: hashlib.sha256(s["png"]).hexdigest() for s in wds.WebDataset(tars, shardshuffle=False)}


def _stats(folder) -> list:
    return [json.loads(open(p).read()) for p in sorted(glob.glob(f"{folder}/*_stats.json"))]


def test_a_run_that_stops_mid_shard_leaves_every_item_readable(write_job, tiny_model, tmp_path, capsys):
    """--limit 7 with shards of 5: a complete shard and a short one; the short one is rebuilt later."""
    from sdbatch.cli import main

    job, out = _dataset_job(write_job, tiny_model), tmp_path / "out"
    assert main(["run", str(job), "-o", str(out), "-q", "--limit", "7"]) == 0
    assert sorted(_samples(out / "dataset")) == [f"{i:09d}" for i in range(7)]
    assert [(s["shard"], s["complete"], s["successes"]) for s in _stats(out / "dataset")] == [(0, True, 5), (1, False, 2)]
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert "shards: 1/3 done, 1 short (waiting for more items) in" in capsys.readouterr().out

    assert main(["run", str(job), "-o", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rendered"], summary["already_done"]) == (5, 7)
    assert sorted(_samples(out / "dataset")) == [f"{i:09d}" for i in range(12)]
    assert [(s["shard"], s["complete"], s["successes"]) for s in _stats(out / "dataset")] == [
        (0, True, 5), (1, True, 5), (2, True, 2)]
    assert not any((out / ".dataset-staging").rglob("*.png"))


def test_a_new_shard_size_repacks_and_renders_nothing_again(write_job, tiny_model, tmp_path):
    from sdbatch.cli import main

    out = tmp_path / "out"
    assert main(["run", str(_dataset_job(write_job, tiny_model)), "-o", str(out), "-q", "--limit", "8"]) == 0
    before = _samples(out / "dataset")
    smaller = _dataset_job(write_job, tiny_model, shard_size=3)
    assert main(["run", str(smaller), "-o", str(out), "-q", "--limit", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rendered"], summary["already_done"]) == (0, 8)
    assert _samples(out / "dataset") == before  # the same pixels, re-packed
    assert [(s["shard"], s["shard_size"], s["complete"], s["successes"]) for s in _stats(out / "dataset")] == [
        (0, 3, True, 3), (1, 3, True, 3), (2, 3, False, 2)]
    assert main(["run", str(smaller), "-o", str(out), "-q"]) == 0
    assert json.loads((out / "summary.json").read_text())["rendered"] == 4
    assert sorted(_samples(out / "dataset")) == [f"{i:09d}" for i in range(12)]
