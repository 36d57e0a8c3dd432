"""One run per output folder: a lock file that names its holder and cannot outlive it.

The lock is an ``fcntl.flock`` on ``OUT/.sdbatch-lock``; the kernel drops it when the
holding process ends however it ends (kill -9 included), so a killed run never leaves a
folder locked. The file's text names the holder (pid, host, start time, command) for the
message a second run prints; text left by a dead holder is reported as a stale lock and
replaced. Within one process, opening the same folder again shares the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from .errors import SdbatchError

LOCK_FILE = ".sdbatch-lock"

_held: dict[str, list] = {}  # real folder path -> [fd, users], for this process
_guard = threading.Lock()


class FolderBusy(SdbatchError):
    """Another live process is running into this output folder."""


def acquire(folder: Path) -> tuple[str, bool]:
    """Lock ``folder`` for this process, or share this process's lock.

    Returns the key for release() and whether this is the first use (only the first may
    tidy the folder: a second use in the same process may be writing).
    """
    key = os.path.realpath(folder)
    with _guard:
        if key in _held:
            _held[key][1] += 1
            return key, False
        fd = _lock_file(Path(key) / LOCK_FILE)
        _held[key] = [fd, 1]
    return key, True


def release(key: str) -> None:
    """Drop one use of the lock; the last one removes the lock file and unlocks."""
    with _guard:
        held = _held.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _held[key]
        try:
            os.unlink(Path(key) / LOCK_FILE)
        except OSError:
            pass
        os.close(held[0])  # closing drops the flock


def _lock_file(path: Path) -> int:
    """Open and flock the lock file, retrying if a releasing holder unlinked it meanwhile."""
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise FolderBusy(f"{path.parent} is in use by another sdbatch run: {_describe(holder)}. "
                             "Wait for it to finish or stop it (a run that is killed releases the folder)") from None
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the file we locked was unlinked by a holder that just finished: lock the new one
            os.close(fd)
            continue
        stale = _read(fd)
        if stale:
            print(f"sdbatch: cleared a stale lock in {path.parent}: {_describe(stale)}, no longer running",
                  file=sys.stderr)
        _write(fd)
        return fd
    raise FolderBusy(f"{path.parent}: could not take its lock file {path} (another run keeps replacing it)")


def _read(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {"text": "unreadable lock file"}


def _write(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return holder.get("text", "a process that left no details")
    return (f"pid {holder['pid']} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
            + (f" ({holder['command']})" if holder.get("command") else ""))
