"""The hook reference documents every hook with its exact signature."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from sdbatch import hookspecs

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def _hookspecs() -> dict:
    return {name: fn for name, fn in vars(hookspecs).items()
            if callable(fn) and hasattr(fn, "sdbatch_spec")}


def test_every_hook_has_a_docstring():
    specs = _hookspecs()
    assert specs, "no hook specs found"
    for name, fn in specs.items():
        assert fn.__doc__ and fn.__doc__.strip(), f"hook {name} has no docstring"


def test_every_hook_is_documented_with_its_exact_signature():
    text = DOC.read_text()
    headings = dict(re.findall(r"^### (\w+)(\(.*\))$", text, flags=re.M))
    for name, fn in _hookspecs().items():
        assert name in headings, f"docs/plugins.md has no section for hook {name}"
        assert headings[name] == str(inspect.signature(fn)), f"documented signature of {name} differs from the code"
    assert set(headings) <= set(_hookspecs()), "docs/plugins.md documents a hook that does not exist"


def test_documented_examples_compile():
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= len(_hookspecs())
    for block in blocks:
        compile(block, str(DOC), "exec")
