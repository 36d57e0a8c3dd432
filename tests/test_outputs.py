"""The output folder (atomic writes, conflicts, path templates, the manifest) and a real run end to end."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from sdbatch.api import Item
from sdbatch.cli import main
from sdbatch.errors import OutputConflict
from sdbatch.output import MANIFEST, TEMP_MARK, Entry, OutputDir, check_template, render_template


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMP_MARK in p.name]


def finish(out: OutputDir, item_id: str, index: int, relpath: str, data: bytes) -> None:
    """Write one file for an item and record the item, as the writer thread does."""
    record = out.write_bytes(relpath, data, item_id, "test")
    out.record(Entry(item_id, index, [record.to_json()], {"id": item_id}))


# ---------------------------------------------------------------- atomic writes
def test_write_bytes_leaves_only_the_final_file(tmp_path):
    out = OutputDir(tmp_path / "out")
    record = out.write_bytes("sub/dir/a.png", b"pixels", "item1", "png")
    assert (tmp_path / "out" / "sub/dir/a.png").read_bytes() == b"pixels"
    assert record.path == "sub/dir/a.png"
    assert record.sha256 == hashlib.sha256(b"pixels").hexdigest()
    assert temporaries(tmp_path) == []


def test_a_crash_before_the_rename_leaves_no_partial_or_temporary_file(tmp_path, monkeypatch):
    out = OutputDir(tmp_path / "out")

    def crash(src, dst):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        out.write_bytes("a/b.png", b"half written", "item1", "png")
    monkeypatch.undo()
    assert not (tmp_path / "out" / "a/b.png").exists()  # never a partial file under the final name
    assert temporaries(tmp_path / "out") == []  # an exception removes it at once; a kill -9 leaves it for the next open


def test_stale_temporaries_anywhere_are_removed_on_open(tmp_path):
    root = tmp_path / "out"
    (root / "deep" / "er").mkdir(parents=True)
    stale = [root / f".x.png.123.456{TEMP_MARK}", root / "deep" / "er" / f".y.jpg.1.2{TEMP_MARK}"]
    for path in stale:
        path.write_bytes(b"junk")
    (root / "keep.png").write_bytes(b"keep")
    OutputDir(root)
    assert not any(p.exists() for p in stale)
    assert (root / "keep.png").read_bytes() == b"keep"


# ---------------------------------------------------------------- conflicts
def test_refuses_to_overwrite_another_items_file(tmp_path):
    out = OutputDir(tmp_path)
    finish(out, "aaaa", 0, "same.png", b"first")
    with pytest.raises(OutputConflict, match="item aaaa"):
        out.write_bytes("same.png", b"second", "bbbb", "png")
    assert (tmp_path / "same.png").read_bytes() == b"first"
    # Also after reopening: ownership comes from the manifest.
    with pytest.raises(OutputConflict, match="item aaaa"):
        OutputDir(tmp_path).write_bytes("same.png", b"second", "bbbb", "png")


def test_same_content_is_fine(tmp_path):
    out = OutputDir(tmp_path)
    finish(out, "aaaa", 0, "same.png", b"first")
    record = out.write_bytes("same.png", b"first", "bbbb", "png")
    assert record.sha256 == hashlib.sha256(b"first").hexdigest()


def test_refuses_to_overwrite_a_foreign_file(tmp_path):
    (tmp_path / "mine.png").write_bytes(b"a user's own file")
    out = OutputDir(tmp_path)
    with pytest.raises(OutputConflict, match="not written by this job"):
        out.write_bytes("mine.png", b"other", "aaaa", "png")
    assert (tmp_path / "mine.png").read_bytes() == b"a user's own file"
    out.write_bytes("mine.png", b"a user's own file", "aaaa", "png")  # identical: nothing lost


def test_write_bytes_refuses_escaping_paths(tmp_path):
    out = OutputDir(tmp_path / "out")
    for relpath in ("../evil.png", "/tmp/evil.png", "a/../../evil.png"):
        with pytest.raises(OutputConflict, match="escapes"):
            out.write_bytes(relpath, b"x", "aaaa", "png")
    assert not (tmp_path / "evil.png").exists()


# ---------------------------------------------------------------- path templates
def make_item(**changes) -> Item:
    fields = dict(index=7, model="models/tiny", prompt="A Red Circle!", negative_prompt="", seed=42, steps=4,
                  guidance=7.5, sampler="DPM++ 2M Karras", width=64, height=96)
    fields.update(changes)
    return Item(**fields)


def test_render_template_fields():
    item = make_item()
    assert render_template("{prompt_slug}/{seed}-{id}.{ext}", item, "png") == f"a-red-circle/42-{item.id}.png"
    assert render_template("{job}/{index:05d}_{width}x{height}_{guidance}.{ext}", item, "jpg", "my job") == \
        "my_job/00007_64x96_7.5.jpg"
    sampler = render_template("{sampler}", item, "png")
    assert "/" not in sampler and " " not in sampler


@pytest.mark.parametrize("template", ["../x/{id}.png", "/abs/{id}.png", "a/../../{id}.png"])
def test_render_template_refuses_escaping_paths(template):
    with pytest.raises(OutputConflict, match="escapes"):
        render_template(template, make_item(), "png")
    assert any("escapes" in p for p in check_template(template))


def test_values_cannot_smuggle_a_parent_folder():
    item = make_item(model="../../..", prompt="../../etc/passwd")
    relpath = render_template("{model}/{prompt_slug}/{id}.png", item, "png")
    assert ".." not in Path(relpath).parts


def test_check_template_names_unknown_fields():
    problems = check_template("{prompt_slugg}/{id}.png")
    assert len(problems) == 1
    assert "unknown field '{prompt_slugg}'" in problems[0] and "did you mean 'prompt_slug'?" in problems[0]
    assert check_template("{prompt_slug}/{seed}-{id}.{ext}") == []


# ---------------------------------------------------------------- manifest
def test_manifest_with_a_truncated_last_line(tmp_path):
    out = OutputDir(tmp_path)
    finish(out, "aaaa", 0, "a.png", b"a")
    finish(out, "bbbb", 1, "b.png", b"b")
    manifest = tmp_path / MANIFEST
    data = manifest.read_bytes()
    manifest.write_bytes(data[: len(data) - 20])  # killed while appending the second line
    reopened = OutputDir(tmp_path)
    assert reopened.is_done("aaaa")
    assert not reopened.is_done("bbbb")


def test_an_item_recorded_after_a_truncated_line_counts_as_done(tmp_path):
    out = OutputDir(tmp_path)
    finish(out, "aaaa", 0, "a.png", b"a")
    finish(out, "bbbb", 1, "b.png", b"b")
    manifest = tmp_path / MANIFEST
    data = manifest.read_bytes()
    manifest.write_bytes(data[: len(data) - 20])
    resumed = OutputDir(tmp_path)
    finish(resumed, "bbbb", 1, "b.png", b"b")  # the resumed run finishes it again
    assert OutputDir(tmp_path).is_done("bbbb")


def test_entry_whose_file_was_deleted_is_not_done(tmp_path):
    out = OutputDir(tmp_path)
    finish(out, "aaaa", 0, "a.png", b"a")
    finish(out, "bbbb", 1, "b.png", b"b")
    (tmp_path / "b.png").unlink()
    reopened = OutputDir(tmp_path)
    assert reopened.is_done("aaaa")
    assert not reopened.is_done("bbbb")
    assert reopened._owner("b.png") is None and reopened._owner("a.png") == "aaaa"


# ---------------------------------------------------------------- end to end
def bit_errors(a: bytes, b: bytes) -> int:
    assert len(a) == len(b)
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b))


def test_watermark_round_trip_and_absence():
    import numpy as np
    from PIL import Image

    from sdbatch_plugins.postprocessors import Watermark, WatermarkOptions, decode_watermark

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize((256, 256), Image.Resampling.LANCZOS)
    marked = Watermark().apply(image, WatermarkOptions(text="sdbatch"), None)
    assert marked.size == image.size
    assert decode_watermark(marked, 7) == b"sdbatch"
    assert bit_errors(decode_watermark(image, 7), b"sdbatch") > 10
    with pytest.raises(ValueError, match="at least 256x256"):
        Watermark().apply(image.resize((255, 300)), WatermarkOptions(), None)


def file_digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "summary.json"}


def manifest_entries(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / MANIFEST).read_text().splitlines()]


def info_json(path: Path, capsys) -> dict:
    assert main(["info", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_run_writes_png_jpeg_webp_with_metadata_and_resumes(write_job, tiny_model, tmp_path, capsys):
    job = write_job(f"""
        model: {tiny_model}
        prompt: a red circle
        negative_prompt: blurry
        steps: 2
        sampler: DPM++ 2M Karras
        sweep:
          seed: [11, 12]
        outputs: [png, jpeg, webp]
        """)
    out = tmp_path / "out"
    assert main(["run", str(job), "-o", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["total"], summary["rendered"], summary["failed"]) == (2, 2, 0)

    entries = manifest_entries(out)
    assert sorted(e["item"]["seed"] for e in entries) == [11, 12]
    for entry in entries:
        item = entry["item"]
        suffixes = sorted(Path(f["path"]).suffix for f in entry["files"])
        assert suffixes == [".jpg", ".png", ".webp"]
        for f in entry["files"]:
            path = out / f["path"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == f["sha256"]
            meta = info_json(path, capsys)
            parsed = meta["parsed"]
            assert parsed["prompt"] == "a red circle"
            assert parsed["negative_prompt"] == "blurry"
            assert int(parsed["Seed"]) == item["seed"]
            assert int(parsed["Steps"]) == item["steps"] == 2
            assert (parsed["Sampler"], parsed["Schedule type"]) == ("DPM++ 2M", "Karras")
            assert parsed["Size"] == f"{item['width']}x{item['height']}" == "64x64"
            assert parsed["sdbatch id"] == entry["id"]
            assert parsed["Model hash"] == entry["item"]["model_hash"] and parsed["Model hash"]
            record = meta["record"]  # PNG: a text chunk; JPEG and WebP: XMP
            assert record["id"] == entry["id"]
            assert record["seed"] == item["seed"]
            assert record["model_hash"] == parsed["Model hash"]
            assert {"sdbatch", "torch", "diffusers", "python"} <= set(record["versions"])
        # The plain-text form of `sdbatch info` prints the parameters.
        png = next(out / f["path"] for f in entry["files"] if f["path"].endswith(".png"))
        assert main(["info", str(png)]) == 0
        assert f"Seed: {item['seed']}" in capsys.readouterr().out

    before = file_digests(out)
    assert main(["run", str(job), "-o", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rendered"], summary["already_done"], summary["failed"]) == (0, 2, 0)
    assert file_digests(out) == before


@pytest.mark.slow
def test_resize_and_watermark_and_a_watermark_too_small(write_job, tiny_model, tmp_path, capsys):
    from PIL import Image

    from sdbatch_plugins.postprocessors import decode_watermark

    job = write_job(f"""
        model: {tiny_model}
        prompt: a blue square
        steps: 2
        postprocess:
          - resize
          - watermark: {{text: sdb}}
        sweep:
          resize.scale: [4, 1]
        outputs:
          - png: {{path: "{{index}}-{{id}}.png"}}
        """)
    out = tmp_path / "out"
    code = main(["run", str(job), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rendered"], summary["failed"]) == (1, 1)

    (entry,) = manifest_entries(out)
    assert entry["index"] == 0
    with Image.open(out / entry["files"][0]["path"]) as image:
        assert image.size == (256, 256)
        # dwtDct is not error-free on every image (imwatermark truncates to uint8 inside): allow one
        # flipped bit of 24; an unmarked image disagrees in about half of them.
        assert bit_errors(decode_watermark(image, 3), b"sdb") <= 1

    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1
    assert failures[0]["index"] == 1
    assert failures[0]["id"] != entry["id"]
    assert "at least 256x256" in failures[0]["error"] and "64x64" in failures[0]["error"]
    assert "at least 256x256" in err


@pytest.mark.slow
def test_watermark_limits_stated_in_the_readme(write_job, tmp_path, capsys):
    """sdbatch-tiny pictures at 256 px: the mark survives PNG and JPEG quality 90, not quality 70."""
    import io

    from PIL import Image

    from sdbatch_plugins.postprocessors import decode_watermark

    job = write_job("""
        prompt: "a {large|small} {red|blue} circle in the centre, on a {white|black} background"
        prompt_sampling: random
        sweep: {seed: {start: 0, count: 4}}
        postprocess: [{resize: {scale: 4}}, {watermark: {text: sdbatch}}]
        outputs: [{png: {path: "{index}.png"}}]
        """)
    assert main(["run", str(job), "-o", str(tmp_path / "out"), "-q"]) == 0

    def exact(quality) -> int:
        count = 0
        for path in sorted((tmp_path / "out").glob("*.png")):
            with Image.open(path) as image:
                image = image.convert("RGB")
            if quality:
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=quality)
                image = Image.open(buffer)
            count += decode_watermark(image, 7) == b"sdbatch"
        return count

    assert exact(None) >= 3 and exact(90) >= 3
    assert exact(70) <= 1


@pytest.mark.parametrize("fmt, options", [("PNG", {"compress_level": 4}), ("JPEG", {"quality": 92}),
                                          ("WEBP", {"quality": 92})])
def test_spooled_encoding_gives_the_bytes_of_an_in_memory_one(fmt, options):
    # Writers encode into a real temporary file, where Pillow releases the GIL (into a BytesIO its
    # JPEG encoder holds it; bench/bench_writers.py shows the threads' cpu/wall): the files stay
    # byte for byte what they were.
    import io

    import numpy as np
    from PIL import Image

    from sdbatch.output import spooled

    image = Image.fromarray((np.random.default_rng(0).random((512, 512, 3)) * 40 + 100).astype("uint8"))
    memory = io.BytesIO()
    image.save(memory, fmt, **options)
    assert spooled(lambda file: image.save(file, fmt, **options)) == memory.getvalue()


# ---------------------------------------------------------------- the writer pool's commits
class _SlowWriter:
    """Writes each item's file through the output folder after a short wait (an encoder's time)."""

    name, parallel = "slow", True

    def __init__(self, out: OutputDir, seconds: float):
        self.out, self.seconds = out, seconds

    def write(self, result) -> list:
        import time

        time.sleep(self.seconds)
        return [self.out.write_bytes(f"{result.item.id}.bin", result.item.id.encode(), result.item.id,
                                     self.name).to_json()]


class _Result:
    def __init__(self, index: int):
        self.item = Item(index, "model", "a prompt", "", index, 1, 1.0, "euler", 8, 8)
        self.model_hash, self.seconds = "hash", 0.0


class _Committer:
    """Commits through the output folder, as the run's Committer does, and records each commit's items."""

    def __init__(self, out: OutputDir):
        self.out, self.batches = out, []
        self.progress = type("Progress", (), {"note": lambda *a: None, "update": lambda *a, **k: None})()

    def commit(self, records: list) -> None:
        self.out.record_all([Entry(r.item.id, r.item.index, r.files, {}) for r in records])
        self.batches.append([r.item.id for r in records])


def _pool(tmp_path, seconds: float, threads: int = 2):
    from sdbatch.writing import WriterPool

    out = OutputDir(tmp_path / "out")
    writer = _SlowWriter(out, seconds)
    committer = _Committer(out)
    entry = type("Entry", (), {"name": "slow", "package": "tests", "module": "tests"})()
    return out, committer, WriterPool([writer], {"slow": entry}, committer, lambda item: False, threads)


def test_a_pool_that_keeps_up_commits_each_item_as_it_is_written(tmp_path):
    import time

    out, committer, pool = _pool(tmp_path, 0.001)
    for index in range(6):  # a render loop slower than writing: each item is alone in the pool
        pool.put([_Result(index)])
        deadline = time.monotonic() + 10
        while len(out) <= index and time.monotonic() < deadline:
            time.sleep(0.002)
        assert len(out) == index + 1  # committed before the next one is rendered
    pool.close()
    assert committer.batches == [[_Result(i).item.id] for i in range(6)]
    out.close()


def test_a_pool_behind_the_render_loop_commits_in_groups_in_plan_order(tmp_path, monkeypatch):
    from sdbatch import output
    from sdbatch.writing import COMMIT_GROUP

    synced = []
    real_sync = output.sync_written
    monkeypatch.setattr(output, "sync_written", lambda root, files: (synced.append(len(files)),
                                                                    real_sync(root, files)))
    out, committer, pool = _pool(tmp_path, 0.01)
    pool.put([_Result(index) for index in range(40)])  # blocks while the queue is full: back-pressure
    pool.close()
    ids = [_Result(i).item.id for i in range(40)]
    assert [i for batch in committer.batches for i in batch] == ids
    assert max(map(len, committer.batches)) >= COMMIT_GROUP and len(committer.batches) <= 40 // COMMIT_GROUP + 2
    # one sync per commit, not one per file: the 40 files share a handful
    assert len(synced) == len(committer.batches) and sum(synced) == 40
    assert all((out.root / f"{i}.bin").is_file() and out.is_done(i) for i in ids)
    out.close()


@pytest.mark.parametrize("how", ["syncfs", "syncfs fails", "SDBATCH_SYNC=files"])
def test_written_files_are_made_durable_at_once_before_their_manifest_lines(tmp_path, monkeypatch, how):
    from sdbatch import output

    if how == "syncfs fails":
        monkeypatch.setattr(output, "_SYNCFS", [lambda fd: -1])
    elif how == "SDBATCH_SYNC=files":
        monkeypatch.setenv("SDBATCH_SYNC", "files")
    elif not output._syncfs(tmp_path):
        pytest.skip("this system has no syncfs")
    out = OutputDir(tmp_path / "out")
    events = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    for index in range(5):
        out.write_bytes(f"{index % 2}/{index}.bin", b"x" * index, f"item{index}", "raw")
    assert events == []  # writing syncs nothing: the commit does, once for all
    out.record_all([Entry(f"item{index}", index, [{"path": f"{index % 2}/{index}.bin", "writer": "raw"}], {})
                    for index in range(5)])
    manifest = str(out.manifest_path)
    if how == "syncfs":  # one syncfs made the files durable: only the manifest is fsynced
        assert events == [manifest]
    else:  # each file, then each folder, then the manifest
        names = [str(out.root / f"{index % 2}/{index}.bin") for index in range(5)]
        assert events == names + [str(out.root / "0"), str(out.root / "1"), manifest]
    out.make_durable()
    assert events[-1] == manifest  # nothing left to sync
    out.close()


def test_a_run_with_per_file_syncs_writes_the_same_files(write_job, tiny_model, tmp_path, monkeypatch):
    """SDBATCH_SYNC=files (an fsync per item file, then per folder) renders and writes what the default does."""
    job = write_job(f"""
        model: {tiny_model}
        steps: 2
        batch_size: 2
        sweep: {{seed: [1, 2, 3]}}
        outputs: [png, jpeg]
    """)
    assert main(["run", str(job), "-o", str(tmp_path / "syncfs"), "-q"]) == 0
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setenv("SDBATCH_SYNC", "files")
    assert main(["run", str(job), "-o", str(tmp_path / "files"), "-q"]) == 0
    images = lambda out: {p.relative_to(out): p.read_bytes()  # noqa: E731
                          for p in sorted(out.rglob("*")) if p.suffix in (".png", ".jpg")}
    assert images(tmp_path / "files") == images(tmp_path / "syncfs") and len(images(tmp_path / "files")) == 6
    assert all(str(tmp_path / "files" / path) in synced for path in images(tmp_path / "files"))  # each one fsynced
