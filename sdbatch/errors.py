"""Errors written for people: each names the file, line, column and key path at fault."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable

KeyPath = tuple  # of str (mapping keys) and int (list indexes)

#: Exit code for a job file that fails validation (argparse uses 2 for usage errors too).
EXIT_INVALID_JOB = 2


#: Characters of a value shown in a message; a hostile file's 600 kB value is cut in the middle.
SHOWN_CHARS = 80
MAX_MESSAGE = 1000
MAX_SHOWN = 200  # problems printed for one file


def shorten(value, limit: int = SHOWN_CHARS) -> str:
    """``str(value)`` cut to about ``limit`` characters, keeping both ends."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    half = max(1, limit // 2 - 3)
    return f"{text[:half]}...({len(text) - 2 * half:,} more)...{text[-half:]}"


def short_repr(value, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut like shorten(); reprs of huge ints are not even computed."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * 0.30103):,} digits"
    if isinstance(value, (str, bytes)) and len(value) > 4 * limit:
        value = value[:2 * limit] + value[-2 * limit:]  # repr only what is shown
    if isinstance(value, (list, dict)) and len(value) > limit:
        return f"a {type(value).__name__} of {len(value):,} entries"
    try:
        return shorten(repr(value), limit)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"


def format_path(path: KeyPath) -> str:
    """Render a key path the way a user would write it: ``outputs[1].png.path``."""
    text = ""
    if len(path) > 12:  # a hostile file nests deeply: show both ends
        return f"{format_path(path[:5])}...{format_path(path[-5:]).lstrip('.')}"
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        else:
            part = shorten(str(part), 40)
            text += f".{part}" if text else part
    return text or "(top level)"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' suffix for the closest choice, or an empty string."""
    lowered: dict[str, str] = {}
    for choice in choices:  # the first spelling wins: pass canonical names before aliases
        lowered.setdefault(str(choice).lower(), str(choice))
    if len(str(word)) > 100:  # no name is that long; difflib would only spend time
        return ""
    match = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean '{lowered[match[0]]}'?)" if match else ""


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match) -> str:
    """A control character as an escape: one problem stays one line, and no terminal codes run."""
    return " " if match.group() == "\n" else match.group().encode("unicode_escape").decode("ascii")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job file."""

    path: KeyPath
    message: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based

    def render(self, filename: str) -> str:
        where = filename
        if self.line is not None:
            where += f":{self.line}:{self.column or 1}"
        text = f"{format_path(self.path)}: {shorten(self.message, MAX_MESSAGE)}"
        return f"{where}: {_CONTROL.sub(_escape, text)}"


class SdbatchError(Exception):
    """Base for errors shown to the user without a traceback."""

    exit_code = 1


class JobError(SdbatchError):
    """A job file failed to parse or validate; carries every problem found at once."""

    exit_code = EXIT_INVALID_JOB

    def __init__(self, filename: str, problems: list[Problem]):
        self.filename = filename
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.column or 0))
        count = len(self.problems)
        header = f"{filename}: {count} problem{'s' if count != 1 else ''} found"
        lines = [header] + [p.render(filename) for p in self.problems[:MAX_SHOWN]]
        if count > MAX_SHOWN:  # a hostile file can hold thousands: the first ones are what to fix
            lines.append(f"{filename}: {count - MAX_SHOWN:,} more problems found, not shown")
        super().__init__("\n".join(lines))


class PluginError(SdbatchError):
    """A plugin failed to load, register or run; names the plugin and its package."""


class DiskFull(SdbatchError):
    """The output folder's disk (or quota) is full: the run stops; finished items are kept."""

    @classmethod
    def wrap(cls, exc, folder) -> "DiskFull | None":
        """A DiskFull for an OSError meaning no space (ENOSPC, EDQUOT), else None."""
        import errno

        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return cls(f"no space left on the disk of {folder} ({exc.strerror}). Finished items are kept and "
                       "nothing partial is left: free some space and run the same command again to resume")
        return None


class OutputConflict(SdbatchError):
    """Writing would replace a finished file with different content."""
