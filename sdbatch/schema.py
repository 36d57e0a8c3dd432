"""Typed validation of YAML data against dataclasses, collecting every problem at once.

The job schema and every plugin's options are plain dataclasses. Field metadata adds
what types cannot say: ``min``/``max`` bounds, ``multiple_of``, ``file``/``folder``/``image``
(the path must exist, relative to the job file; ``image`` takes a file or a folder of images;
``format`` = image, audio or safetensors checks a file's first bytes),
``model_ref`` (a name, hub id or path; an existing path is made absolute), ``min_items``/
``max_items`` (list lengths; ``items`` holds the metadata of each entry) and ``help``
(shown in errors).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from .errors import KeyPath, Problem, did_you_mean, short_repr, shorten
from .yamlsource import Source

_MISSING = dataclasses.MISSING


class Invalid(Exception):
    """Raised inside conversion once a problem has been recorded for this value."""


class Checker:
    """Converts YAML data into typed values, recording problems against a Source."""

    def __init__(self, source: Source):
        self.source = source
        self.problems: list[Problem] = []

    def fail(self, path: KeyPath, message: str) -> Invalid:
        self.problems.append(self.source.problem(path, message))
        return Invalid(message)

    def convert(self, value: Any, tp: Any, path: KeyPath, meta: dict | None = None) -> Any:
        """Convert ``value`` to type ``tp``; raise Invalid after recording a problem."""
        meta = meta or {}
        origin = typing.get_origin(tp)
        if tp is Any:
            return value
        if origin in (Union, types.UnionType):
            return self._union(value, tp, path, meta)
        if origin is Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                shown = ", ".join(repr(c) for c in choices)
                raise self.fail(path, f"expected one of {shown}, got {short_repr(value)}"
                                      f"{did_you_mean(value, map(str, choices))}")
            return value
        if origin in (list, tuple) or tp in (list, tuple):
            return self._list(value, tp, path, meta)
        if origin is dict or tp is dict:
            return self._dict(value, tp, path)
        if dataclasses.is_dataclass(tp):
            return self.dataclass(value, tp, path)
        return self._scalar(value, tp, path, meta)

    def dataclass(self, value: Any, cls: type, path: KeyPath) -> Any:
        """Build ``cls`` from a mapping; unknown keys and missing fields are problems."""
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping of {_describe(cls)}, got {kind_of(value)}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs, broken = {}, False
        for key in value:
            if key not in fields:
                known = ", ".join(fields) or "none"
                self.fail(path + (key,), f"unknown key '{key}'{did_you_mean(key, fields)}; known keys: {known}")
                broken = True
        for name, f in fields.items():
            if name in value:
                try:
                    kwargs[name] = self.convert(value[name], hints[name], path + (name,), dict(f.metadata))
                except Invalid:
                    broken = True
            elif f.default is _MISSING and f.default_factory is _MISSING:
                self.fail(path, f"missing required key '{name}'" + _help(f.metadata))
                broken = True
        if broken:
            raise Invalid(str(path))
        return cls(**kwargs)

    def _union(self, value, tp, path, meta):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:
            return self.convert(value, non_null[0], path, meta)
        for arg in non_null:  # first type that accepts the value silently wins
            trial = Checker(self.source)
            try:
                result = trial.convert(value, arg, path, meta)
            except Invalid:
                continue
            return result
        raise self.fail(path, f"expected {' or '.join(_describe(a) for a in non_null)}, got {kind_of(value)} "
                              f"{short_repr(value)}")

    def _list(self, value, tp, path, meta):
        args = typing.get_args(tp)
        item_type = args[0] if args else Any
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {kind_of(value)}")
        result, broken = [], False
        for i, item in enumerate(value):
            try:
                result.append(self.convert(item, item_type, path + (i,), meta.get("items")))
            except Invalid:
                broken = True
        if "min_items" in meta and len(result) < meta["min_items"]:
            raise self.fail(path, f"expected at least {meta['min_items']} entries, got {len(value)}")
        if "max_items" in meta and len(result) > meta["max_items"]:
            raise self.fail(path, f"expected at most {meta['max_items']} entries, got {len(value)}")
        if broken:
            raise Invalid(str(path))
        return result

    def _dict(self, value, tp, path):
        args = typing.get_args(tp)
        value_type = args[1] if len(args) == 2 else Any
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {kind_of(value)}")
        result, broken = {}, False
        for key, item in value.items():
            try:
                result[str(key)] = self.convert(item, value_type, path + (key,))
            except Invalid:
                broken = True
        if broken:
            raise Invalid(str(path))
        return result

    def _scalar(self, value, tp, path, meta):
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value) if abs(value) < 2 ** 1000 else math.inf
        if tp is Path:
            tp = str
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise self.fail(path, f"expected {_describe(tp)}, got {kind_of(value)} {short_repr(value)}" + _help(meta))
        if tp is float and not math.isfinite(value):
            raise self.fail(path, f"expected a finite number, got {short_repr(value)}")
        if "min" in meta and value < meta["min"]:
            raise self.fail(path, f"must be at least {meta['min']}, got {short_repr(value)}")
        if "max" in meta and value > meta["max"]:
            raise self.fail(path, f"must be at most {meta['max']}, got {short_repr(value)}")
        if "multiple_of" in meta and value % meta["multiple_of"]:
            raise self.fail(path, f"must be a multiple of {meta['multiple_of']}, got {value}")
        if meta.get("model_ref"):  # a name, hub id or path: paths are relative to the job file
            return self._model_ref(value, path)
        if meta.get("file") or meta.get("folder") or meta.get("image"):
            kind = "image" if meta.get("image") else "folder" if meta.get("folder") else "file"
            return self._existing_path(value, path, kind, meta.get("format", "image" if kind == "image" else None))
        return value

    def _model_ref(self, value: str, path: KeyPath) -> str:
        """An existing path made absolute (a .safetensors file's header checked); else the name as given."""
        from .inputs import safetensors_problem

        if too_long_for_a_path(value):  # plugins would stat it and get ENAMETOOLONG
            raise self.fail(path, f"not a name, a hub id or a path: {shorten(value)}")
        candidate = resolve_path(value, self.source.folder)
        try:
            exists = candidate is not None and candidate.exists()
        except OSError:
            exists = False
        if not exists:
            return value
        problem = safetensors_problem(candidate)
        if problem:
            raise self.fail(path, problem)
        return str(candidate)

    def _existing_path(self, value: str, path: KeyPath, kind: str, fmt: str | None = None) -> str:
        """The path resolved against the job's folder; a file, a folder, or (image) either.

        Files must be regular files of bounded size: a device (/dev/zero), a FIFO or a socket
        would hang the run, so it is refused here.
        """
        from .inputs import format_problem, input_problem

        resolved = resolve_path(value, self.source.folder)
        problem = input_problem(resolved, kind) if resolved is not None else "not a usable path"
        if not problem and fmt and resolved.is_file():
            problem = format_problem(resolved, fmt)
        if problem:
            raise self.fail(path, f"{problem}: {shorten(value)}" + (
                f" (looked for {shorten(str(resolved))})" if resolved is not None and str(resolved) != value else ""))
        return str(resolved)


def too_long_for_a_path(value: str) -> bool:
    """Longer than any file system takes: 4096 bytes in all or 255 in one part (and so no hub id)."""
    return len(value.encode()) > 4096 or any(len(part.encode()) > 255 for part in value.split("/"))


def resolve_path(value: str, folder: Path) -> Path | None:
    """``value`` as a path relative to ``folder``; None when no path can be made of it (a NUL, a bad ~user)."""
    if not value or "\0" in value:
        return None
    try:
        resolved = Path(value).expanduser()
    except RuntimeError:  # ~nobody-such
        return None
    return resolved if resolved.is_absolute() else folder / resolved


def _help(meta) -> str:
    return f" ({meta['help']})" if meta and meta.get("help") else ""


def kind_of(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {dict: "a mapping", list: "a list", str: "text", bool: "true/false", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _describe(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    names = {str: "text", int: "an integer", float: "a number", bool: "true or false", Path: "a path"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) in (list, tuple):
        return "a list"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def option_fields(cls: type) -> dict[str, tuple[Any, dict]]:
    """Each field of an options dataclass with its type and metadata (for sweep axes)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], dict(f.metadata)) for f in dataclasses.fields(cls)}
