"""The plugin system: built-ins through entry points, fake plugins in code, overrides, load filters, failures."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

import sdbatch
from sdbatch import hookspecs
from sdbatch.api import Writer
from sdbatch.cli import main
from sdbatch.errors import JobError, PluginError
from sdbatch.job import load_job
from sdbatch.plugins import KINDS, load_registry

#: What each built-in entry point registers (kind, name), written out from the feature list.
BUILTINS = {
    "models": {("model_loader", n) for n in ("sdbatch-tiny", "diffusers-folder", "single-file", "hub")},
    "text": {("conditioner", "text")},
    "images": {("writer", n) for n in ("png", "jpeg", "webp")},
    "xyz_grid": {("writer", "xyz_grid")},
    "postprocessors": {("postprocessor", n) for n in ("resize", "watermark")},
    "samplers": {("sampler", n) for n in (
        "Euler a", "Euler", "Euler Karras", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M",
        "DPM++ 2M Karras", "DPM++ SDE", "DPM++ SDE Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras",
        "DPM fast", "DDIM", "DDPM", "PLMS", "PNDM", "UniPC", "DEIS", "LCMScheduler", "TCDScheduler",
    )},
}


# ---------------------------------------------------------------- a fake third-party plugin
@dataclass
class TxtOptions:
    path: str = "{id}.txt"
    upper: bool = False


class TxtWriter(Writer):
    """Writes each item's prompt to a text file and an index at the end."""

    name = "txt"
    description = "prompts as text files"
    Options = TxtOptions
    finished: list = []

    def write(self, result) -> list:
        text = result.item.prompt.upper() if self.options.upper else result.item.prompt
        relpath = self.options.path.format(id=result.item.id)
        record = self.context.out.write_bytes(relpath, text.encode(), result.item.id, self.name)
        return [record.to_json()]

    def finish(self, entries) -> list:
        TxtWriter.finished.append(sorted(e.id for e in entries))
        index = "\n".join(sorted(e.id for e in entries)).encode()
        return [self.context.out.write_bytes("index.txt", index, "txt-index", self.name).path]


class TxtPlugin:
    @sdbatch.hookimpl
    def register_writers(register):
        register(TxtWriter, aliases=("text-file",))


class FakePng(Writer):
    name = "png"


class ShadowingPlugin:
    @sdbatch.hookimpl
    def register_writers(register):
        register(FakePng)


class OverridingPlugin:
    @sdbatch.hookimpl
    def register_writers(register):
        register(FakePng, override=True)


# ---------------------------------------------------------------- listing
def test_plugins_command_lists_every_builtin(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_key = {(r["kind"], r["name"]): r for r in rows}
    for plugin, provided in BUILTINS.items():
        for key in provided:
            assert key in by_key, f"{key} missing from `sdbatch plugins`"
            row = by_key[key]
            assert row["plugin"] == plugin
            assert row["package"] == "sdbatch"
            assert row["version"] == sdbatch.__version__


def test_plugins_command_table(capsys):
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "PLUGIN", "PACKAGE", "VERSION"]
    png = next(line for line in lines if line.split()[:2] == ["writer", "png"])
    assert png.split()[2:] == ["images", "sdbatch", sdbatch.__version__]
    assert any(line.startswith("sampler") and "DPM++ 2M Karras" in line for line in lines)


def test_builtins_are_declared_as_entry_points():
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="sdbatch")}
    for plugin in BUILTINS:
        assert names[plugin] == f"sdbatch_plugins.{plugin}"


# ---------------------------------------------------------------- fake plugins in code
def test_fake_plugin_appears_in_the_registry(make_registry):
    registry = make_registry(TxtPlugin)
    entry = registry.get("writer", "txt")
    assert entry is not None and entry.obj is TxtWriter
    assert entry.origin.plugin == "TxtPlugin" and "registered in code" in entry.origin.package
    assert registry.get("writer", "text-file") is entry
    assert registry.get("writer", "png") is not None  # built-ins still load
    assert load_registry().get("writer", "txt") is None  # nothing leaks into a fresh registry


def test_fake_plugin_validates_in_a_job(make_registry, write_job, tiny_model):
    registry = make_registry(TxtPlugin)
    job = load_job(write_job(f"model: {tiny_model}\noutputs: [png, {{txt: {{upper: true}}}}]\n"), registry)
    assert [use.name for use in job.uses["outputs"]] == ["png", "txt"]
    assert job.uses["outputs"][1].options == {"path": "{id}.txt", "upper": True}
    with pytest.raises(JobError, match=r"outputs\[0\]\.txt\.uper: unknown key 'uper'"):
        load_job(write_job(f"model: {tiny_model}\noutputs: [{{txt: {{uper: true}}}}]\n"), registry)


@pytest.mark.slow
def test_fake_writer_works_in_a_run(make_registry, write_job, tiny_model, tmp_path):
    from sdbatch.run import LocalExecutor

    registry = make_registry(TxtPlugin)
    job = load_job(write_job(f"""
        model: {tiny_model}
        prompt: a tiny red dot
        steps: 2
        outputs: [{{text-file: {{upper: true}}}}]
        """), registry)
    TxtWriter.finished.clear()
    summary = LocalExecutor(job, registry, tmp_path / "out", quiet=True).run()
    item = job.plan.item_at(0)
    assert summary.rendered == 1
    assert (tmp_path / "out" / f"{item.id}.txt").read_text() == "A TINY RED DOT"
    assert TxtWriter.finished == [[item.id]]
    assert summary.run_files == ["index.txt"]


def test_shadowing_a_builtin_without_override_names_both_plugins(make_registry):
    with pytest.raises(PluginError) as info:
        make_registry(ShadowingPlugin)
    message = str(info.value)
    assert "writer 'png'" in message
    assert "ShadowingPlugin" in message
    assert "images (sdbatch" in message
    assert "override=True" in message


def test_override_replaces_the_builtin(make_registry):
    registry = make_registry(OverridingPlugin)
    entry = registry.get("writer", "png")
    assert entry.obj is FakePng
    assert entry.origin.plugin == "OverridingPlugin"
    assert registry.get("writer", "jpeg").origin.plugin == "images"


def test_registering_without_a_name_is_an_error(make_registry):
    class Nameless:
        @sdbatch.hookimpl
        def register_postprocessors(register):
            register(object())

    with pytest.raises(PluginError, match="Nameless.*without a name"):
        make_registry(Nameless)


def test_a_plugin_raising_in_its_hook_is_named(make_registry):
    class Exploding:
        @sdbatch.hookimpl
        def register_samplers(register):
            raise RuntimeError("kaboom")

    with pytest.raises(PluginError, match=r"Exploding.*register_samplers.*RuntimeError: kaboom"):
        make_registry(Exploding)


# ---------------------------------------------------------------- SDBATCH_LOAD_PLUGINS
def test_load_plugins_empty_loads_none(monkeypatch):
    monkeypatch.setenv("SDBATCH_LOAD_PLUGINS", "")
    registry = load_registry()
    assert all(registry.names(kind) == [] for kind in KINDS)
    assert "installed: none" in registry.unknown_message("writer", "png")


def test_load_plugins_selects_by_entry_point_name(monkeypatch, make_registry):
    monkeypatch.setenv("SDBATCH_LOAD_PLUGINS", "samplers")
    registry = load_registry()
    assert "Euler a" in registry.names("sampler")
    assert all(registry.names(kind) == [] for kind in KINDS if kind != "sampler")
    assert {e.origin.plugin for e in registry} == {"samplers"}
    # In-code plugins still register.
    assert make_registry(TxtPlugin).names("writer") == ["txt"]


def test_load_plugins_list(monkeypatch):
    monkeypatch.setenv("SDBATCH_LOAD_PLUGINS", " images , postprocessors")
    registry = load_registry()
    assert set(registry.names("writer")) == {"png", "jpeg", "webp"}
    assert set(registry.names("postprocessor")) == {"resize", "watermark"}
    assert registry.names("sampler") == []


# ---------------------------------------------------------------- a plugin that fails to import
class FakeDist:
    metadata = {"Name": "sdbatch-broken"}
    version = "9.9"


@pytest.fixture
def broken_plugin(monkeypatch, tmp_path):
    """An installed entry point ``broken`` whose module raises on import."""
    (tmp_path / "tests_broken_plugin_xyz.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.metadata.entry_points
    ep = importlib.metadata.EntryPoint(name="broken", value="tests_broken_plugin_xyz", group="sdbatch")
    vars(ep).update(dist=FakeDist())

    def entry_points(**params):
        found = list(real(**params))
        return found + [ep] if params.get("group") == "sdbatch" else found

    import sdbatch.plugins

    monkeypatch.setattr(sdbatch.plugins.importlib.metadata, "entry_points", entry_points)
    return ep


def test_failed_plugin_is_recorded_not_raised(broken_plugin):
    registry = load_registry()
    assert registry.get("writer", "png") is not None  # the others still load
    (failure,) = registry.failures
    origin = failure.origin
    assert (origin.plugin, origin.package, origin.version) == ("broken", "sdbatch-broken", "9.9")
    assert failure.error == "RuntimeError: boom at import"
    message = registry.unknown_message("writer", "csv")
    assert "unknown writer 'csv'" in message
    assert "plugin broken (sdbatch-broken 9.9) failed to load: RuntimeError: boom at import" in message


def test_failed_plugin_in_the_cli(broken_plugin, write_job, tiny_model, capsys):
    assert main(["plugins"]) == 0
    captured = capsys.readouterr()
    assert "FAILED  broken (sdbatch-broken 9.9): RuntimeError: boom at import" in captured.out
    assert "Traceback" not in captured.out + captured.err

    job = write_job(f"model: {tiny_model}\noutputs: [csv]\n")
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert "warning: plugin broken (sdbatch-broken 9.9) failed to load" in err
    assert "outputs[0]: unknown writer 'csv'" in err
    assert "note: plugin broken (sdbatch-broken 9.9) failed to load: RuntimeError: boom at import" in err
    assert "Traceback" not in err


def test_missing_plugin_module_is_reported_by_name(monkeypatch):
    real = importlib.metadata.entry_points
    ep = importlib.metadata.EntryPoint(name="ghost", value="no_such_module_for_sdbatch", group="sdbatch")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **p: list(real(**p)) + ([ep] if p.get("group") == "sdbatch" else []))
    (failure,) = load_registry().failures
    assert failure.origin.plugin == "ghost"
    assert failure.error.startswith("ModuleNotFoundError")


# ---------------------------------------------------------------- hooks
def hook_specs() -> dict:
    return {name: fn for name, fn in vars(hookspecs).items()
            if callable(fn) and hasattr(fn, "sdbatch_spec")}


def test_every_hook_has_a_docstring():
    specs = hook_specs()
    assert set(KINDS.values()) <= set(specs)
    for name, fn in specs.items():
        doc = inspect.getdoc(fn)
        assert doc and len(doc.split()) >= 5, f"hook {name} has no docstring"
        if name.startswith("register_"):
            assert "register(" in doc, f"hook {name}'s docstring does not show how to call register"


def test_every_register_hook_takes_register():
    for name, fn in hook_specs().items():
        if name.startswith("register_"):
            assert list(inspect.signature(fn).parameters) == ["register"], name


# ---------------------------------------------------------------- samplers
@pytest.fixture(scope="module")
def sd_scheduler_config(tiny_model) -> dict:
    """The SD 1.x scheduler config a model folder ships (what samplers are built from)."""
    return json.loads((Path(tiny_model) / "scheduler" / "scheduler_config.json").read_text())


def test_every_sampler_builds_a_diffusers_scheduler(registry, sd_scheduler_config):
    import diffusers

    names = registry.names("sampler")
    assert len(names) >= 40
    for name in names:
        sampler = registry.get("sampler", name).obj
        scheduler = sampler.create(sd_scheduler_config)
        assert isinstance(scheduler, diffusers.SchedulerMixin), name
        expected = sampler.scheduler if isinstance(sampler.scheduler, str) else sampler.scheduler.__name__
        assert type(scheduler).__name__ == expected, name
        for key, value in sampler.config.items():
            assert scheduler.config[key] == value, (name, key)
        scheduler.set_timesteps(4)
        assert len(scheduler.timesteps) >= 4, name


def test_sampler_variants_and_aliases(registry):
    karras = registry.get("sampler", "DPM++ 2M Karras").obj
    assert (karras.scheduler, karras.config) == ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})
    assert registry.get("sampler", "euler a").name == "Euler a"
    assert registry.get("sampler", "EulerAncestralDiscreteScheduler").name == "Euler a"
    assert registry.get("sampler", "dpmpp_2m_karras").name == "DPM++ 2M Karras"


@pytest.mark.parametrize("misspelt, close", [("Eulr a", "euler a"), ("DPM++ 2M Karas", "dpm++ 2m karras"),
                                             ("UniPc", "unipc")])
def test_misspelt_sampler_lists_close_matches(registry, misspelt, close):
    message = registry.unknown_message("sampler", misspelt)
    assert f"unknown sampler '{misspelt}'" in message
    assert f"did you mean '{close}'?" in message.lower()
    assert "installed: Euler a, Euler," in message
    with pytest.raises(PluginError, match="unknown sampler"):
        registry.require("sampler", misspelt)


# ---------------------------------------------------------------- aliases
class _AliasWriter(Writer):
    name = "a"


class _XWriter(Writer):
    name = "x"


class AliasingPlugin:
    @sdbatch.hookimpl
    def register_writers(register):
        register(_AliasWriter, aliases=("x",))


class XPlugin:
    @sdbatch.hookimpl
    def register_writers(register):
        register(_XWriter)


def test_a_name_taken_by_an_alias_is_refused(make_registry):
    # XPlugin registered last is called first: its 'x' comes after AliasingPlugin's alias 'x'.
    with pytest.raises(PluginError, match="writer 'x' is registered by both"):
        make_registry(XPlugin, AliasingPlugin)


def test_an_alias_cannot_shadow_a_registered_name(make_registry):
    try:
        registry = make_registry(AliasingPlugin, XPlugin)  # XPlugin's 'x' first, then the alias 'x'
    except PluginError as exc:
        assert "'x'" in str(exc)
        return
    assert registry.get("writer", "x").obj is _XWriter


def test_origin_of_an_in_code_plugin_reads_cleanly(make_registry):
    with pytest.raises(PluginError) as info:
        make_registry(ShadowingPlugin)
    assert "((" not in str(info.value)


@pytest.mark.parametrize("name", ["canny", "depth", "pose", "image", "img2img", "inpaint", "text", "lora", "outpaint"])
def test_an_installed_plugin_can_replace_a_builtin_conditioner(name):
    from sdbatch.api import Conditioner

    class Replacement(Conditioner):
        description = "a third-party replacement"

        def condition(self, items, options, model, state):
            return None

    Replacement.name = name

    class Plugin:
        @sdbatch.hookimpl
        def register_conditioners(register):
            register(Replacement(), override=True)

    # Registered before the entry points, as an installed package that sorts first would be: the
    # built-ins must still be asked last (trylast), or both would claim the name.
    import pluggy

    from sdbatch import hookspecs
    from sdbatch.plugins import ENTRY_POINT_GROUP, _load_entrypoints, build_registry

    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    pm.register(Plugin, name="replacement")
    _load_entrypoints(pm)
    registry = build_registry(pm)
    assert isinstance(registry.get("conditioner", name).obj, Replacement)
