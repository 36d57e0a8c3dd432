"""AUTOMATIC1111 ``parameters`` text: layout, field order, quoting, parsing, and EXIF UserComment."""

from __future__ import annotations

import io

import pytest

from sdbatch.api import Item, PluginUse
from sdbatch.metadata import (
    a1111_fields,
    decode_user_comment,
    encode_user_comment,
    format_parameters,
    parse_parameters,
    quote,
    read_image_metadata,
)

#: A1111's infotext order (modules/processing.py create_infotext), written out independently.
A1111_KEYS = [
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Seed resize from",
    "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio",
    "Token merging ratio hr", "Init image hash", "RNG", "NGMS", "Tiling",
]


def make_item(**changes) -> Item:
    fields = dict(index=0, model="models/tiny", prompt="a red circle", negative_prompt="", seed=42, steps=20,
                  guidance=7.0, sampler="Euler a", width=64, height=64,
                  conditioners=(PluginUse("text", {"clip_skip": 1}),))
    fields.update(changes)
    return Item(**fields)


def parameters_for(item: Item, model_hash: str = "b0b7509559", version: str = "0.1.0") -> str:
    return format_parameters(item.prompt, item.negative_prompt, a1111_fields(item, model_hash, version))


def params_keys(line: str) -> list[str]:
    return [part.split(":", 1)[0] for part in line.split(", ")]


# ---------------------------------------------------------------- writing
def test_layout_matches_a1111_without_negative_prompt():
    item = make_item()
    text = parameters_for(item)
    lines = text.split("\n")
    assert len(lines) == 2  # no "Negative prompt:" line when it is empty
    assert lines[0] == "a red circle"
    assert lines[1].startswith(
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 64x64, Model hash: b0b7509559, Model: tiny, "
    )
    assert lines[1].endswith("Version: sdbatch 0.1.0")
    assert f"sdbatch id: {item.id}" in lines[1]


def test_layout_with_negative_prompt():
    text = parameters_for(make_item(negative_prompt="blurry, ugly", guidance=7.5, width=128, seed=3))
    lines = text.split("\n")
    assert lines[:2] == ["a red circle", "Negative prompt: blurry, ugly"]
    assert lines[2].startswith("Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 3, Size: 128x64, ")


def test_fields_follow_a1111_order_then_extras_then_version():
    item = make_item(conditioners=(PluginUse("text", {"clip_skip": 2}),), sampler="DPM++ 2M Karras")
    keys = params_keys(parameters_for(item).split("\n")[-1])
    known = [k for k in keys if k in A1111_KEYS]
    assert known == sorted(known, key=A1111_KEYS.index)
    assert "Clip skip" in known
    extras = keys[len(known):]
    assert keys[: len(known)] == known, "A1111 fields come first"
    assert extras[-1] == "Version"


@pytest.mark.parametrize("sampler, expected", [
    ("DPM++ 2M Karras", "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7,"),
    ("Euler Exponential", "Sampler: Euler, Schedule type: Exponential, CFG scale: 7,"),
    ("DPM++ 2M SDE Karras", "Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 7,"),
    ("Euler a", "Sampler: Euler a, CFG scale: 7,"),
])
def test_schedule_type_is_split_off_the_sampler(sampler, expected):
    assert expected in parameters_for(make_item(sampler=sampler))


def test_clip_skip_written_only_above_one():
    assert "Clip skip" not in parameters_for(make_item())
    assert "Clip skip: 2" in parameters_for(make_item(conditioners=(PluginUse("text", {"clip_skip": 2}),)))


@pytest.mark.parametrize("value, expected", [
    ("Euler a", "Euler a"),
    ("512x512", "512x512"),
    ("a, b", '"a, b"'),
    ("key: value", '"key: value"'),
    ('say "hi"', '"say \\"hi\\""'),
])
def test_quoting(value, expected):
    assert quote(value) == expected


def test_values_with_commas_and_colons_are_quoted_in_the_text():
    text = parameters_for(make_item(model="models/best, v2: final.safetensors"))
    assert 'Model: "best, v2: final"' in text
    assert parse_parameters(text)["Model"] == "best, v2: final"


# ---------------------------------------------------------------- reading
def test_parse_a1111_docstring_example():
    text = (
        "girl with an artist's beret, determined, blue eyes, desert scene\n"
        "Negative prompt: ugly, fat, obese\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
    )
    parsed = parse_parameters(text)
    assert parsed == {
        "prompt": "girl with an artist's beret, determined, blue eyes, desert scene",
        "negative_prompt": "ugly, fat, obese",
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size": "512x512",
        "Model hash": "45dee52b",
    }


def test_parse_without_negative_prompt_and_multiline_prompt():
    text = "first line\nsecond line, with comma\nSteps: 4, Sampler: DDIM, CFG scale: 1.5, Seed: 1, Size: 64x64"
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "first line\nsecond line, with comma"
    assert parsed["negative_prompt"] == ""
    assert (parsed["Sampler"], parsed["CFG scale"]) == ("DDIM", "1.5")


def test_round_trip_of_an_item():
    item = make_item(prompt="a cat: sitting, happily", negative_prompt="bad\nworse", seed=4294967295,
                     sampler="DPM++ 2M Karras", guidance=6.5, width=96, height=128)
    parsed = parse_parameters(parameters_for(item))
    assert parsed["prompt"] == item.prompt
    assert parsed["negative_prompt"] == item.negative_prompt
    assert parsed["Steps"] == "20"
    assert parsed["Sampler"] == "DPM++ 2M"
    assert parsed["Schedule type"] == "Karras"
    assert parsed["CFG scale"] == "6.5"
    assert parsed["Seed"] == "4294967295"
    assert parsed["Size"] == "96x128"
    assert parsed["Model hash"] == "b0b7509559"
    assert parsed["Model"] == "tiny"
    assert parsed["sdbatch id"] == item.id
    assert parsed["Version"] == "sdbatch 0.1.0"


# ---------------------------------------------------------------- EXIF UserComment
@pytest.mark.parametrize("text", ["Steps: 20, Sampler: Euler a", "héllo, 日本語\nNegative prompt: ✓", ""])
def test_user_comment_round_trip(text):
    raw = encode_user_comment(text)
    assert raw[:8] == b"UNICODE\x00"
    assert raw[8:] == text.encode("utf-16-be")
    assert decode_user_comment(raw) == text


def test_user_comment_ascii_and_str():
    assert decode_user_comment(b"ASCII\x00\x00\x00Steps: 20") == "Steps: 20"
    assert decode_user_comment("already text") == "already text"


def test_user_comment_little_endian():
    raw = b"UNICODE\x00" + "Steps: 20, Seed: 1".encode("utf-16-le")
    assert decode_user_comment(raw) == "Steps: 20, Seed: 1"


@pytest.mark.parametrize("fmt, suffix", [("JPEG", "jpg"), ("WEBP", "webp")])
def test_exif_user_comment_survives_an_image_file(tmp_path, fmt, suffix):
    from PIL import Image

    text = parameters_for(make_item(negative_prompt="ugly, blurry"))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = encode_user_comment(text)
    path = tmp_path / f"image.{suffix}"
    Image.new("RGB", (16, 16), "red").save(path, fmt, exif=exif.tobytes())
    meta = read_image_metadata(path)
    assert meta["parameters"] == text
    assert meta["parsed"]["negative_prompt"] == "ugly, blurry"
    assert meta["parsed"]["Seed"] == "42"


def test_png_parameters_chunk_is_read(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    text = parameters_for(make_item())
    info = PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG", pnginfo=info)
    (tmp_path / "a.png").write_bytes(buffer.getvalue())
    meta = read_image_metadata(tmp_path / "a.png")
    assert meta["parameters"] == text
    assert meta["record"] is None
    assert meta["parsed"]["Size"] == "64x64"
