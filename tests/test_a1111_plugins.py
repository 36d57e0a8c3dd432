"""What plugins add to the A1111 text (img2img, inpaint, ControlNet, edit, resize), written by the real
image writers, read back by `sdbatch info` and by sd-parsers; the full record in PNG, JPEG and WebP."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from sdbatch.cli import main
from sdbatch.job import load_job_text
from sdbatch.metadata import read_image_metadata
from sdbatch.run import make_writers, run_context

INPUTS = Path(__file__).resolve().parents[1] / "jobs" / "inputs"

JOBS = {
    "img2img": f"""
        prompt: a blue circle
        conditioners: [text, {{img2img: {{image: {INPUTS}/scene-orange-squares.png, strength: 0.3}}}}]
        """,
    "inpaint": f"""
        prompt: a red circle
        conditioners:
          - text
          - inpaint: {{image: {INPUTS}/scene-orange-squares.png, mask: {INPUTS}/mask-right.png, mask_blur: 2}}
        """,
    "controlnet": f"""
        prompt: a green triangle
        conditioners:
          - text
          - canny: {{image: {INPUTS}/scene-white-triangle.png, controlnet: sdbatch-tiny-canny, scale: 0.5}}
          - depth: {{image: {INPUTS}/scene-white-triangle.png, controlnet: sdbatch-tiny-depth,
                     estimator: sdbatch-tiny-depth, end: 0.8, resize: fit}}
        """,
    "edit": """
        edit:
          source: {prompt: "a large red circle in the centre, on a white background", seed: 7}
          directions: [{kind: prompt-difference, from: "a large red circle", to: "a large blue circle"}]
          strengths: [-2]
        """,
    "upscale": """
        prompt: a red square
        postprocess: [{resize: {scale: 4}}]
        """,
}


def write_image(registry, tmp_path, kind: str, fmt: str = "png") -> Path:
    """Plan the job (no model is loaded) and store its first item through the job's image writer."""
    from PIL import Image

    text = textwrap.dedent(JOBS[kind]) + f"seed: 5\nsteps: 4\noutputs: [{{{fmt}: {{path: '{kind}.{{ext}}'}}}}]\n"
    job = load_job_text(text, registry, filename=str(tmp_path / f"{kind}.yaml"))
    context = run_context(job, tmp_path / "out")
    (writer,) = make_writers(job, context)
    item = next(iter(job.plan.items(0, 1)))
    result = SimpleNamespace(item=item, image=Image.new("RGB", (64, 64), "blue"), model_hash="0123456789",
                             seconds=0.0, outputs={})
    (record,) = writer.write(result)
    return context.out.root / record["path"]


def params(path: Path) -> str:
    return read_image_metadata(path)["parameters"].split("\n")[-1]


def test_img2img_writes_denoising_strength_where_a1111_does(registry, tmp_path):
    line = params(write_image(registry, tmp_path, "img2img"))
    assert ", Seed: 5, Size: 64x64, Model hash: 0123456789, Model: sdbatch-tiny, Denoising strength: 0.3, " \
           "RNG: CPU, sdbatch id: " in line


def test_inpaint_writes_strength_and_mask_blur(registry, tmp_path):
    parsed = read_image_metadata(write_image(registry, tmp_path, "inpaint"))["parsed"]
    assert (parsed["Denoising strength"], parsed["Mask blur"]) == ("1", "2")


def test_controlnet_units_in_the_extensions_format(registry, tmp_path):
    path = write_image(registry, tmp_path, "controlnet")
    line = params(path)
    assert ('ControlNet 0: "Module: canny, Model: sdbatch-tiny-canny, Weight: 0.5, Resize Mode: Crop and Resize, '
            'Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1", '
            'ControlNet 1: "Module: depth, Model: sdbatch-tiny-depth, Weight: 1, Resize Mode: Resize and Fill, '
            'Guidance Start: 0, Guidance End: 0.8", sdbatch id: ') in line
    assert line.index("RNG: CPU") < line.index("ControlNet 0")  # extras follow A1111's own fields


def test_edit_writes_direction_and_strength(registry, tmp_path):
    parsed = read_image_metadata(write_image(registry, tmp_path, "edit"))["parsed"]
    assert parsed["Edit direction"] == "prompt-difference: a large red circle -> a large blue circle"
    assert parsed["Edit strength"] == "-2"


def test_upscale_writes_a1111_postprocess_fields(registry, tmp_path):
    parsed = read_image_metadata(write_image(registry, tmp_path, "upscale"))["parsed"]
    assert (parsed["Postprocess upscale by"], parsed["Postprocess upscaler"]) == ("4", "Lanczos")


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_every_format_carries_the_full_record(registry, tmp_path, fmt):
    path = write_image(registry, tmp_path, "img2img", fmt)
    meta = read_image_metadata(path)
    assert meta["record"]["prompt"] == "a blue circle"
    assert meta["record"]["conditioners"][1]["img2img"]["strength"] == 0.3
    assert meta["record"]["model_hash"] == "0123456789"
    assert meta["parsed"]["Denoising strength"] == "0.3"


def test_sdbatch_info_shows_each_kinds_settings(registry, tmp_path, capsys):
    paths = {kind: write_image(registry, tmp_path, kind, "jpeg" if kind == "edit" else "png") for kind in JOBS}
    capsys.readouterr()
    assert main(["info", *map(str, paths.values())]) == 0
    shown = capsys.readouterr().out
    for setting in ("Denoising strength: 0.3", "Mask blur: 2", 'ControlNet 1: "Module: depth',
                    "Edit strength: -2", "Postprocess upscale by: 4"):
        assert setting in shown
    assert main(["info", "--json", str(paths["edit"])]) == 0
    assert json.loads(capsys.readouterr().out)["record"]["extra"]["edit"]["strength"] == -2


@pytest.mark.parametrize("kind, fmt, prompt, seed, field, value", [
    ("img2img", "png", "a blue circle", "5", "Denoising strength", "0.3"),
    # sd-parsers splits a quoted ControlNet unit at its commas, as it does A1111's own
    ("controlnet", "webp", "a green triangle", "5", "Threshold A", "100"),
    ("edit", "jpeg", "a large red circle in the centre, on a white background", "7", "Edit strength", "-2"),
    ("upscale", "png", "a red square", "5", "Postprocess upscale by", "4"),
])
def test_sd_parsers_reads_them(registry, tmp_path, kind, fmt, prompt, seed, field, value):
    sd_parsers = pytest.importorskip("sd_parsers")

    info = sd_parsers.ParserManager().parse(str(write_image(registry, tmp_path, kind, fmt)))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    (sampler,) = info.samplers
    assert (sampler.parameters["seed"], sampler.parameters["steps"], sampler.prompts[0].value) == (seed, "4", prompt)
    assert info.metadata[field] == value
