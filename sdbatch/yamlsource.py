"""Safe YAML loading that remembers the line and column of every key and value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import JobError, KeyPath, Problem, shorten

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


#: Bounds that keep validation fast and small whatever the file says.
MAX_FILE_BYTES = 16 << 20  # a job file, not a dataset
MAX_VALUES = 200_000  # scalars, lists and mappings after aliases are expanded ("billion laughs")
MAX_DEPTH = 64  # nesting of lists and mappings; a job needs fewer than ten


def load_file(path: str | Path) -> Source:
    """Read and parse a job file; a missing file or bad YAML raises JobError."""
    path = Path(path)
    try:
        data = read_bounded(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        raise JobError(str(path), [Problem((), "file not found")]) from None
    except (OSError, ValueError) as exc:
        raise JobError(str(path), [Problem((), f"cannot read the file: {shorten(str(exc))}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[:exc.start].decode("utf-8")
        line, column = _line_column(before, len(before))
        bad = data[exc.start:exc.start + 1].hex()
        raise JobError(str(path), [Problem((), f"invalid UTF-8 (byte 0x{bad}); save the file as UTF-8",
                                           line, column)]) from None
    return load_text(text, str(path))


def read_bounded(path: Path, limit: int) -> bytes:
    """A regular file's bytes, refusing devices, FIFOs and files over ``limit`` bytes."""
    import stat

    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if info.st_size > limit:
        raise ValueError(f"{path} has {info.st_size:,} bytes; the limit is {limit:,}")
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} has more than {limit:,} bytes")
    return data


def _line_column(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of a character offset in ``text``."""
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def load_text(text: str, filename: str = "<job>") -> Source:
    """Parse YAML text with a safe loader, recording a mark for every key path."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        source = Source(None, filename)
        problems: list[Problem] = []
        builder = _Builder(loader, source, problems)
        source.data = builder.build(node, (), 0) if node is not None else {}
    except yaml.MarkedYAMLError as exc:
        raise JobError(filename, [_syntax_problem(exc)]) from None
    except yaml.reader.ReaderError as exc:  # a control character: libyaml gives a character offset
        line, column = _line_column(text, exc.position)
        raise JobError(filename, [Problem((), f"invalid YAML: character U+{exc.character:04X} is not "
                                               f"allowed ({exc.reason})", line, column)]) from None
    except yaml.YAMLError as exc:
        raise JobError(filename, [Problem((), f"invalid YAML: {shorten(str(exc))}")]) from None
    except RecursionError:
        raise JobError(filename, [Problem((), "invalid YAML: nested too deeply (or a merge key '<<' "
                                              "that includes itself)")]) from None
    finally:
        loader.dispose()
    if problems:
        raise JobError(filename, problems)
    return source


def _syntax_problem(exc: yaml.MarkedYAMLError) -> Problem:
    """Where parsing failed, and where the construct it was reading began (an unclosed '[' ...)."""
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
    message = exc.problem or exc.context or "syntax error"
    context = exc.context if exc.problem else None
    if context and exc.context_mark and exc.problem_mark and \
            (exc.context_mark.line, exc.context_mark.column) != (exc.problem_mark.line, exc.problem_mark.column):
        opened = exc.context_mark
        message += f" ({context} that begins at line {opened.line + 1}, column {opened.column + 1})"
    elif context:
        message = f"{context}: {message}"
    return Problem((), f"invalid YAML: {message}", line, col)


class _Builder:
    """Turns composed nodes into plain Python data, recording marks, within MAX_VALUES and MAX_DEPTH."""

    def __init__(self, loader, source: Source, problems: list[Problem]):
        self.loader, self.source, self.problems = loader, source, problems
        self.count = 0
        self.open: set[int] = set()  # nodes being built: an alias to one of them is a cycle

    def fail(self, path: KeyPath, node, message: str) -> None:
        mark = node.start_mark
        self.problems.append(Problem(path, message, mark.line + 1, mark.column + 1))

    def build(self, node, path: KeyPath, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            if self.count == MAX_VALUES + 1:
                self.fail(path, node, f"the file holds more than {MAX_VALUES:,} values once its aliases (*name) "
                                      "are expanded")
            return None
        self.source.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.ScalarNode):
            return self.loader.construct_object(node, deep=True)
        if id(node) in self.open:
            self.fail(path, node, "an alias (*name) inside the value it names: the value would contain itself")
            return None
        if depth >= MAX_DEPTH:
            self.fail(path, node, f"nested more than {MAX_DEPTH} levels deep")
            return None
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path, depth)
            return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
        finally:
            self.open.discard(id(node))

    def _mapping(self, node, path: KeyPath, depth: int) -> dict:
        self.loader.flatten_mapping(node)  # resolves YAML merge keys (<<)
        result: dict = {}
        for key_node, value_node in node.value:
            key = self.loader.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, (str, int, float, bool)) or key is None:
                self.fail(path, key_node, "mapping keys must be plain scalars")
                continue
            child = path + (key,)
            if key in result:
                self.fail(child, key_node, f"duplicate key '{shorten(key)}'")
            self.source.marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            result[key] = self.build(value_node, child, depth + 1)
        return result
