"""The output folder under attack and accident: a second run, planted links, a full disk.

- one run per folder: a second stops at once naming the first (pid, host, start); a killed
  run's lock is detected and cleared; ``sdbatch status`` only reads;
- symbolic links planted in the folder (files and folders) never make sdbatch write elsewhere;
- a full disk stops the run with one message, leaves nothing partial, and the run resumes.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdbatch.cli import main
from sdbatch.errors import OutputConflict
from sdbatch.lock import FolderBusy
from sdbatch.output import TEMP_MARK, OutputDir

HOLD = "import sys, time\nfrom sdbatch.output import OutputDir\nOutputDir(sys.argv[1])\nprint('ready', flush=True)\ntime.sleep(120)\n"


@pytest.fixture
def holder(tmp_path):
    """Another process that holds tmp_path/out as a run would; killed at the end."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield out, proc
    proc.kill()
    proc.wait()


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMP_MARK in p.name]


# ---------------------------------------------------------------- one run per folder
def test_a_second_run_into_a_busy_folder_stops_at_once_naming_the_other(holder, tmp_path, capsys):
    out, proc = holder
    with pytest.raises(FolderBusy) as error:
        OutputDir(out)
    message = str(error.value)
    assert f"pid {proc.pid}" in message and f"host {socket.gethostname()}" in message and "started 20" in message

    job = tmp_path / "job.yaml"
    job.write_text("prompt: a red circle\nsteps: 2\n")
    assert main(["run", str(job), "-o", str(out), "-q"]) == 1  # before any model is loaded
    assert f"in use by another sdbatch run: pid {proc.pid}" in capsys.readouterr().err
    assert not (out / "manifest.jsonl").exists() and not (out / "job.yaml").exists()


def test_a_killed_runs_lock_is_detected_and_cleared(holder, capsys):
    out, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stale = json.loads((out / ".sdbatch-lock").read_text())
    assert stale["pid"] == proc.pid  # the killed run could not remove its lock file
    folder = OutputDir(out)  # ... but the kernel released its lock
    assert f"cleared a stale lock in {out}: pid {proc.pid}" in capsys.readouterr().err
    assert json.loads((out / ".sdbatch-lock").read_text())["pid"] == os.getpid()
    folder.close()
    assert not (out / ".sdbatch-lock").exists()


def test_status_only_reads_a_live_runs_folder(holder, registry):
    from sdbatch.run import run_status

    out, _proc = holder
    (out / "job.yaml").write_text("prompt: a\nsteps: 2\n")
    live = out / "videos" / f".x.mp4.12345{TEMP_MARK}.mp4"  # the live run's video being encoded
    live.parent.mkdir()
    live.write_bytes(b"encoding")
    status = run_status(out, registry)
    assert status["done"] == 0 and live.read_bytes() == b"encoding"


def test_temporaries_of_a_killed_run_are_removed_by_the_next_run_only(tmp_path):
    out = tmp_path / "out"
    (out / "deep").mkdir(parents=True)
    stale = out / "deep" / f".a.png.999.1{TEMP_MARK}"
    stale.write_bytes(b"half")
    first = OutputDir(out)
    assert not stale.exists()
    stale.write_bytes(b"being written by this process")
    OutputDir(out)  # the same process opening the folder again shares the lock and tidies nothing
    assert stale.exists()
    first.close()


# ---------------------------------------------------------------- planted links
@pytest.mark.parametrize("name", ["manifest.jsonl", "failures.jsonl", "summary.json"])
def test_a_planted_file_link_stops_the_run_before_it_writes(tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(victim)
    with pytest.raises(OutputConflict, match="symbolic link"):
        OutputDir(out)
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("folder", ["grids", "cats", "deep/er"])
def test_a_planted_folder_link_never_receives_files(tmp_path, folder):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    (out / folder).parent.mkdir(parents=True, exist_ok=True)
    (out / folder).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutputConflict, match="outside the output folder"):
        OutputDir(out)  # found at the start
    (out / folder).unlink()
    opened = OutputDir(out)
    (out / folder).symlink_to(elsewhere, target_is_directory=True)  # planted while the run goes on
    with pytest.raises(OutputConflict, match="outside the output folder"):
        opened.write_bytes(f"{folder}/a.png", b"image", "item1", "png")
    with pytest.raises(OutputConflict, match="outside the output folder"):
        opened.write_run_file(f"{folder}/grid.png", b"grid", "xyz_grid")
    assert list(elsewhere.iterdir()) == []
    opened.close()


def test_a_link_planted_as_manifest_during_a_run_is_not_appended_to(tmp_path):
    from sdbatch.output import Entry

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = OutputDir(tmp_path / "out")
    (tmp_path / "out" / "manifest.jsonl").symlink_to(victim)
    with pytest.raises(OutputConflict, match="symbolic link"):
        out.record(Entry("id1", 0, [], {}))
    assert victim.read_text() == "precious\n"
    out.close()


def test_a_link_inside_the_folder_that_stays_inside_is_fine(tmp_path):
    out = tmp_path / "out"
    (out / "real").mkdir(parents=True)
    (out / "alias").symlink_to(out / "real", target_is_directory=True)
    opened = OutputDir(out)
    opened.write_bytes("alias/a.png", b"image", "item1", "png")
    assert (out / "real" / "a.png").read_bytes() == b"image"
    opened.close()


# ---------------------------------------------------------------- a full disk
def _disk_full_after(monkeypatch, writes: int):
    """Make os.write and os.fsync fail with ENOSPC after ``writes`` calls of either (a full disk)."""
    calls = []

    def failing(real):
        def call(fd, *args):
            calls.append(fd)
            if len(calls) > writes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, *args)
        return call

    monkeypatch.setattr(os, "write", failing(os.write))
    monkeypatch.setattr(os, "fsync", failing(os.fsync))


def test_a_full_disk_leaves_no_temporary_and_no_partial_file(tmp_path, monkeypatch):
    out = OutputDir(tmp_path / "out")
    _disk_full_after(monkeypatch, 0)
    with pytest.raises(OSError) as error:
        out.write_bytes("a/b.png", b"image", "item1", "png")
    assert error.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        out.write_run_file("grids/g.png", b"grid", "xyz_grid")
    monkeypatch.undo()
    assert temporaries(tmp_path / "out") == [] and not (tmp_path / "out" / "a" / "b.png").exists()
    out.close()


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_message_and_the_run_resumes(write_job, tiny_model, tmp_path,
                                                                        monkeypatch, capsys):
    job = write_job(f"""
        model: {tiny_model}
        steps: 2
        batch_size: 2
        sweep: {{seed: [1, 2, 3, 4, 5, 6]}}
        outputs: [png]
    """)
    out = tmp_path / "out"
    # job.yaml (write, fsync, folder); the first batch's two images (a write each; one syncfs, not counted, makes
    # them durable), the manifest; the third image finds the disk full
    _disk_full_after(monkeypatch, 6)
    # one writer thread, so which write finds the disk full (and so what was committed) is fixed
    assert main(["run", str(job), "-o", str(out), "-q", "--write-threads", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("no space left") == 1 and "Traceback" not in err and "run the same command again" in err
    assert temporaries(out) == [] and not (out / ".sdbatch-lock").exists()
    finished = (out / "manifest.jsonl").read_text().splitlines()
    assert 1 <= len(finished) < 6

    monkeypatch.undo()  # space again
    assert main(["run", str(job), "-o", str(out), "-q"]) == 0
    ids = [json.loads(line)["id"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6
    assert len(list(out.rglob("*.png"))) == 6


# ---------------------------------------------------------------- what a killed Ray driver leaves
def test_the_next_run_ends_only_leftovers_of_a_noted_dead_cluster(tmp_path):
    from sdbatch.ray_executor import SESSIONS, reap_sessions

    def process(*words):  # a stand-in whose command line names a session, as Ray's agents' do
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *words])

    dead, live = f"session_dead_{os.getpid()}", f"session_live_{os.getpid()}"
    agent = process("ray::DashboardAgent", f"--session-dir=/tmp/ray/{dead}")
    other_agent = process("ray::RuntimeEnvAgent", f"--session-dir=/tmp/ray/{live}")
    raylet = process("raylet", f"--session_name={live}")  # that cluster is still running
    stranger = process("ray::DashboardAgent", "--session-dir=/tmp/ray/session_not_noted")
    try:
        (tmp_path / SESSIONS).write_text(f"{dead}\n{live}\n")
        assert reap_sessions(tmp_path) == [agent.pid]
        assert agent.wait(timeout=10) == -signal.SIGKILL
        assert other_agent.poll() is None and raylet.poll() is None and stranger.poll() is None
        assert (tmp_path / SESSIONS).read_text().split() == [live]  # noted until its cluster is gone
    finally:
        for proc in (agent, other_agent, raylet, stranger):
            proc.kill()
            proc.wait()
