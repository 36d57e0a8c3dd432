"""Errors written for people: each names the file, line, column and key path at fault."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable

KeyPath = tuple  # of str (mapping keys) and int (list indexes)

#: Exit code for a job file that fails validation (argparse uses 2 for usage errors too).
EXIT_INVALID_JOB = 2


def format_path(path: KeyPath) -> str:
    """Render a key path the way a user would write it: ``outputs[1].png.path``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' suffix for the closest choice, or an empty string."""
    lowered: dict[str, str] = {}
    for choice in choices:  # the first spelling wins: pass canonical names before aliases
        lowered.setdefault(str(choice).lower(), str(choice))
    match = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean '{lowered[match[0]]}'?)" if match else ""


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
        return f"{where}: {format_path(self.path)}: {self.message}"


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
        super().__init__("\n".join([header] + [p.render(filename) for p in self.problems]))


class PluginError(SdbatchError):
    """A plugin failed to load, register or run; names the plugin and its package."""


class OutputConflict(SdbatchError):
    """Writing would replace a finished file with different content."""
