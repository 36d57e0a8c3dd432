"""Safe YAML loading that remembers the line and column of every key and value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import JobError, KeyPath, Problem

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Source:
    """A parsed YAML document plus where each key path came from."""

    data: Any
    filename: str = "<job>"
    marks: dict = field(default_factory=dict)  # KeyPath -> (line, column), 1-based

    @property
    def folder(self) -> Path:
        """Folder that relative paths in the job are resolved against."""
        if self.filename.startswith("<"):  # text that came from no file, e.g. "<job>"
            return Path.cwd()
        return Path(self.filename).parent

    def where(self, path: KeyPath) -> tuple[int | None, int | None]:
        """Line and column for a key path, falling back to the closest ancestor."""
        path = tuple(path)
        while True:
            if path in self.marks:
                return self.marks[path]
            if not path:
                return None, None
            path = path[:-1]

    def problem(self, path: KeyPath, message: str) -> Problem:
        line, column = self.where(path)
        return Problem(tuple(path), message, line, column)


def load_file(path: str | Path) -> Source:
    """Read and parse a job file; a missing file or bad YAML raises JobError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(str(path), [Problem((), "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(str(path), [Problem((), f"cannot read the file: {exc}")]) from None
    return load_text(text, str(path))


def load_text(text: str, filename: str = "<job>") -> Source:
    """Parse YAML text with a safe loader, recording a mark for every key path."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        source = Source(None, filename)
        problems: list[Problem] = []
        source.data = _build(loader, node, (), source, problems) if node is not None else {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        message = " ".join(filter(None, [exc.context, exc.problem]))
        raise JobError(filename, [Problem((), f"invalid YAML: {message}", line, col)]) from None
    except yaml.YAMLError as exc:
        raise JobError(filename, [Problem((), f"invalid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    if problems:
        raise JobError(filename, problems)
    return source


def _build(loader, node, path: KeyPath, source: Source, problems: list[Problem]) -> Any:
    """Turn a composed node into plain Python data, recording marks as it goes."""
    source.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<)
        result: dict = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                mark = key_node.start_mark
                problems.append(Problem(path, "mapping keys must be plain scalars", mark.line + 1, mark.column + 1))
                continue
            child = path + (key,)
            if key in result:
                mark = key_node.start_mark
                problems.append(Problem(child, f"duplicate key '{key}'", mark.line + 1, mark.column + 1))
            source.marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            result[key] = _build(loader, value_node, child, source, problems)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, path + (i,), source, problems) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)
