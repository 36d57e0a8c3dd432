"""Tests for the plugin's objects, without rendering: run with `pytest` in this folder."""

from __future__ import annotations

import csv
import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import sdbatch_colorgrade as plugin
from sdbatch.output import Entry, OutputDir


@pytest.fixture
def image():
    """A 16x16 image: a red-to-blue gradient, so every channel has some range."""
    ramp = np.linspace(30, 220, 16, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], np.full((16, 16), 120, np.uint8), ramp[::-1, None]), -1)
    return Image.fromarray(np.ascontiguousarray(pixels))


def grade(image, **options):
    processor = plugin.ColorGrade()
    return np.asarray(processor.apply(image, processor.parse_options(options), item=None)).astype(int)


def test_default_options_leave_the_image_unchanged(image):
    assert (grade(image) == np.asarray(image)).all()


def test_saturation_zero_gives_grey(image):
    pixels = grade(image, saturation=0.0)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_temperature_warms_and_cools(image):
    original = np.asarray(image).astype(int)
    warm, cool = grade(image, temperature=0.5), grade(image, temperature=-0.5)
    assert warm[..., 0].mean() > original[..., 0].mean() > cool[..., 0].mean()
    assert warm[..., 2].mean() < original[..., 2].mean() < cool[..., 2].mean()


def test_gamma_and_brightness(image):
    original = np.asarray(image).astype(int)
    assert grade(image, gamma=2.0).mean() > original.mean()
    assert grade(image, brightness=0.0).max() == 0


def test_catalogue_lists_entries_in_plan_order(tmp_path):
    out = OutputDir(tmp_path)
    record = out.write_bytes("a.png", b"png bytes", "id-a", "png")
    item = {"prompt": 'a "quoted", prompt', "negative_prompt": "", "seed": 7, "steps": 2, "guidance": 7.5,
            "sampler": "Euler a", "width": 64, "height": 32}
    entries = [Entry("id-b", 1, [], {**item, "seed": 8}), Entry("id-a", 0, [{**record.to_json(), "image": True}], item)]
    writer = plugin.Catalogue(plugin.CatalogueOptions(path="{job}.csv"), SimpleNamespace(out=out, job_name="demo"))
    assert writer.finish(entries) == ["demo.csv"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "demo.csv").read_text())))
    assert [row["id"] for row in rows] == ["id-a", "id-b"]
    assert rows[0]["prompt"] == 'a "quoted", prompt' and rows[0]["size"] == "64x32"
    assert rows[0]["file"] == "a.png" and rows[0]["sha256"] == record.sha256
    assert rows[1]["file"] == "" and rows[1]["seed"] == "8"


def test_catalogue_path_is_checked():
    problems = plugin.Catalogue.check(plugin.CatalogueOptions(path="../{prompt}.csv"), job=None)
    assert any("unknown field '{prompt}'" in p for p in problems)


def test_hooks_register_one_of_each():
    registered = []
    plugin.register_postprocessors(register=lambda obj, **kw: registered.append(obj.name))
    plugin.register_writers(register=lambda obj, **kw: registered.append(obj.name))
    assert registered == ["colorgrade", "catalogue"]
