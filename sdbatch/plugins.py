"""The plugin manager factory and the registry of everything plugins provide.

Built-in plugins live in ``plugins/`` (import package ``sdbatch_plugins``) and are found
through the same ``sdbatch`` entry-point group as third-party packages.

Environment:
  SDBATCH_LOAD_PLUGINS  comma-separated entry-point names to load (empty: none; unset: all)
  SDBATCH_TRACE_HOOKS   set to 1 to print every hook call to stderr
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import DiskFull, PluginError, SdbatchError, did_you_mean

ENTRY_POINT_GROUP = "sdbatch"

#: kind -> the hook that registers it
KINDS = {
    "family": "register_families",
    "model_loader": "register_model_loaders",
    "conditioner": "register_conditioners",
    "sampler": "register_samplers",
    "direction": "register_directions",
    "postprocessor": "register_postprocessors",
    "writer": "register_writers",
}


@dataclass
class Origin:
    """Where a plugin came from: its entry-point name and distribution."""

    plugin: str
    package: str = "(not installed)"
    version: str = ""

    def __str__(self) -> str:
        if self.package.startswith("("):
            return f"{self.plugin} {self.package}"
        return f"{self.plugin} ({self.package} {self.version})".replace(" )", ")")


@dataclass
class Entry:
    """One registered thing."""

    kind: str
    name: str
    obj: Any
    origin: Origin
    aliases: tuple = ()
    override: bool = False  # registered to replace any other plugin's entry of this name


def describe_entry(entry: Entry) -> str:
    """How errors name a registered thing: ``writer 'png' (plugin images, package sdbatch 0.1.0)``."""
    origin = entry.origin
    if origin.package.startswith("("):  # "(registered in code)", "(not installed)"
        where = origin.package[1:-1]
    else:
        where = f"package {origin.package} {origin.version}".rstrip()
    return f"{entry.kind.replace('_', ' ')} '{entry.name}' (plugin {origin.plugin}, {where})"


class PluginCallError(Exception):
    """A plugin raised while handling items: those items fail, the run goes on.

    Not a SdbatchError on purpose: a SdbatchError (a bad job, an output conflict) stops a run.
    """


@contextlib.contextmanager
def plugin_errors(entry: Entry, fatal: bool = False):
    """Re-raise an exception from plugin code inside the block as one that names the plugin and package.

    SdbatchErrors pass through unchanged (they already speak to the user). Anything else
    becomes PluginCallError (an item failure), or PluginError with ``fatal=True`` (stops the run).
    """
    from .api import BatchSplit

    try:
        yield
    except (SdbatchError, PluginCallError, BatchSplit):
        raise
    except Exception as exc:
        full = DiskFull.wrap(exc, "the output folder")
        if full:  # not the plugin's fault, and no other item can succeed: stop the run
            raise full from exc
        message = f"{describe_entry(entry)} failed: {type(exc).__name__}: {exc}"
        raise (PluginError if fatal else PluginCallError)(message) from exc


@dataclass
class LoadFailure:
    origin: Origin
    error: str


@dataclass
class Registry:
    """Everything registered, by kind and name (aliases resolve to the same entry)."""

    entries: dict = field(default_factory=lambda: {kind: {} for kind in KINDS})
    aliases: dict = field(default_factory=lambda: {kind: {} for kind in KINDS})
    failures: list = field(default_factory=list)
    pm: Any = None  # the plugin manager, for hooks called at run time (prepare_model)

    def get(self, kind: str, name: str) -> Entry | None:
        table = self.entries[kind]
        name = self.aliases[kind].get(name, name)
        return table.get(name)

    def names(self, kind: str) -> list[str]:
        return list(self.entries[kind])

    def all_names(self, kind: str) -> list[str]:
        return list(self.entries[kind]) + list(self.aliases[kind])

    def require(self, kind: str, name: str) -> Entry:
        """The entry for ``name``, or a PluginError that lists what is installed."""
        entry = self.get(kind, name)
        if entry is None:
            raise PluginError(self.unknown_message(kind, name))
        return entry

    def unknown_message(self, kind: str, name: str) -> str:
        label = kind.replace("_", " ")
        known = ", ".join(self.names(kind)) or "none"
        message = f"unknown {label} '{name}'{did_you_mean(name, self.all_names(kind))}; installed: {known}"
        for failure in self.failures:
            message += f"\n  note: plugin {failure.origin} failed to load: {failure.error}"
        return message

    def __iter__(self) -> Iterable[Entry]:
        for table in self.entries.values():
            yield from table.values()


def get_plugin_manager(load_entrypoints: bool = True, plugins: Iterable = ()) -> tuple[pluggy.PluginManager, list]:
    """A fresh plugin manager with sdbatch's hook specs, plus plugins that failed to load.

    ``plugins`` are extra module or objects to register (tests use this).
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    failures: list[LoadFailure] = []
    if load_entrypoints:
        failures = _load_entrypoints(pm)
    for plugin in plugins:
        pm.register(plugin)
    if os.environ.get("SDBATCH_TRACE_HOOKS"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return pm, failures


def _selected_names() -> set | None:
    value = os.environ.get("SDBATCH_LOAD_PLUGINS")
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _load_entrypoints(pm: pluggy.PluginManager) -> list[LoadFailure]:
    """Import each entry point of the group; a failing one is recorded, not raised."""
    selected = _selected_names()
    failures = []
    seen = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (selected is not None and ep.name not in selected) or (ep.name, ep.value) in seen:
            continue
        seen.add((ep.name, ep.value))
        origin = _origin(ep)
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # any import-time failure is the plugin's, not ours
            failures.append(LoadFailure(origin, f"{type(exc).__name__}: {exc}"))
            continue
        _ORIGINS[id(module)] = origin
    return failures


_ORIGINS: dict[int, Origin] = {}


def _origin(ep) -> Origin:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return Origin(ep.name)
    return Origin(ep.name, dist.metadata["Name"], dist.version)


def origin_of(pm: pluggy.PluginManager, plugin: Any) -> Origin:
    """Where a registered plugin object came from."""
    known = _ORIGINS.get(id(plugin))
    if known is not None:
        return known
    name = pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))
    return Origin(name, "(registered in code)")


def build_registry(pm: pluggy.PluginManager, failures: list | None = None) -> Registry:
    """Call every register_* hook, one plugin at a time so each entry knows its origin."""
    registry = Registry(failures=list(failures or []), pm=pm)
    for kind, hook_name in KINDS.items():
        hook = getattr(pm.hook, hook_name)
        # pluggy calls implementations last-registered-first, tryfirst before trylast.
        for impl in reversed(hook.get_hookimpls()):
            origin = origin_of(pm, impl.plugin)
            register = _make_register(registry, kind, origin)
            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(f"plugin {origin} failed in {hook_name}: {type(exc).__name__}: {exc}") from exc
    return registry


def _make_register(registry: Registry, kind: str, origin: Origin):
    def register(obj: Any, aliases: Iterable[str] = (), override: bool = False) -> None:
        name = getattr(obj, "name", "")
        if not name:
            raise PluginError(f"plugin {origin} registered a {kind} without a name: {obj!r}")
        existing = registry.get(kind, name)
        if existing is not None:
            if existing.obj is obj or existing.override:
                return  # an earlier plugin explicitly replaced this name
            raise PluginError(
                f"{kind} '{name}' is registered by both plugin {existing.origin} and plugin {origin}; "
                "a plugin cannot silently shadow another: rename it, or register it with override=True"
            )
        for alias in aliases:
            taken = registry.get(kind, alias)
            if taken is not None and not override:
                raise PluginError(
                    f"plugin {origin} registers alias '{alias}' for {kind} '{name}', but '{alias}' already names "
                    f"{kind} '{taken.name}' of plugin {taken.origin}; drop the alias or pass override=True"
                )
        entry = Entry(kind, name, obj, origin, tuple(aliases), override)
        registry.entries[kind][name] = entry
        for alias in aliases:
            if override or registry.get(kind, alias) is None:
                registry.aliases[kind][alias] = name

    return register


def load_registry(plugins: Iterable = (), load_entrypoints: bool = True) -> Registry:
    """The usual way in: a plugin manager from entry points, then its registry."""
    pm, failures = get_plugin_manager(load_entrypoints=load_entrypoints, plugins=plugins)
    return build_registry(pm, failures)
