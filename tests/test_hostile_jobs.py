"""Attacks on validation, one by one: each is refused with exit code 2 and one located message, quickly.

The fuzz test (test_fuzz.py) finds such cases at random; these pin the ones an outside
attack found, with the line, column, key path and words of the message expected.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from sdbatch.cli import main


def position(text: str, needle: str) -> tuple[int, int]:
    """1-based (line, column) where ``needle`` first starts in ``text``."""
    start = text.index(needle)
    return text.count("\n", 0, start) + 1, start - (text.rfind("\n", 0, start) + 1) + 1


def validate(path: Path, capsys) -> tuple[int, str]:
    began = time.monotonic()
    code = main(["validate", str(path)])
    assert time.monotonic() - began < 10, "validation must stay fast whatever the file says"
    return code, capsys.readouterr().err


NESTED_POWER = '"0:(((9**999)**999)**999)"'
LAUGHS = "\n".join(["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
    f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 10) + "]" for n in range(1, 10)])

# (id, job text, needle where the problem is, key path, fragments of the message)
CASES = [
    ("recursive-alias", "prompt: &p [*p]\n", "&p", "prompt[0]", ["alias", "contain itself"]),
    ("billion-laughs", LAUGHS + "\nsweep: {prompt: *a9}\n", None, None, ["more than 200,000 values"]),
    ("deep-nesting", "sweep:\n  seed: " + "[" * 100 + "1" + "]" * 100 + "\n", None, None, ["nested more than 64 levels"]),
    ("nested-power", "animation:\n  keyframes: {0: {prompt: a}, 10: {prompt: b}}\n  schedules: {guidance: "
     + NESTED_POWER + "}\n", "guidance: \"", "animation.schedules.guidance", ["fails at t=0"]),
    ("huge-animation", "animation:\n  keyframes: {0: {prompt: a}, 1000000000: {prompt: b}}\n", "1000000000",
     "animation.keyframes[1000000000]", ["past the limit of 100,000 frames"]),
    ("unicode-digit-keyframe", "animation:\n  keyframes: {0: {prompt: a}, \"²\": {prompt: b}}\n", '"²"',
     "animation.keyframes.²", ["frame numbers"]),
    ("unicode-digit-schedule", "animation:\n  keyframes: {0: {prompt: a}, 5: {prompt: b}}\n"
     "  schedules: {guidance: \"٣:(7)\"}\n", "guidance: \"", "animation.schedules.guidance", ["not a frame number"]),
    ("nan-guidance", "guidance: .nan\n", "guidance", "guidance", ["finite number"]),
    ("inf-fps", "animation: {fps: .inf, keyframes: {0: {prompt: a}}}\n", "fps", "animation.fps", ["finite"]),
    ("huge-int-as-float", "guidance: " + "9" * 400 + "\n", "guidance", "guidance", ["finite number"]),
    ("outputs-mapping", "outputs: {png: {}}\n", "outputs", "outputs", ["expected a list of writers", "a mapping"]),
    ("conditioners-mapping", "conditioners: {text: {}}\n", "conditioners", "conditioners", ["expected a list"]),
    ("empty-output", "outputs: [{}]\n", "{}", "outputs[0]", ["one-key mapping"]),
    ("long-model-path", "model: \"" + "m" * 5000 + "\"\n", "model", "model", ["mmmm...("]),
    ("long-controlnet-name", "conditioners: [text, {canny: {image: a.png, controlnet: " + "c" * 300 + "}}]\n",
     "controlnet", "conditioners[1].canny.controlnet", ["not a name, a hub id or a path"]),
    ("long-wildcards-path", "wildcards: \"" + "w" * 5000 + "\"\n", "wildcards", "wildcards", ["File name too long"]),
    ("empty-direction-pair", "edit:\n  source: {prompt: a, seed: 1}\n  directions: [{kind: prompt-difference, "
     "pairs: [[]]}]\n", "[]]", "edit.directions[0].pairs[0]", ["at least 2 entries"]),
    ("many-variants", "prompt: \"" + "{a|b|c|d}" * 10 + "\"\n", "prompt", "prompt", ["more than 100,000 prompts"]),
    ("many-alternatives", "prompt: \"{" + "|".join(map(str, range(2000))) + "}\"\n", "prompt", "prompt",
     ["alternatives", "wildcard file"]),
    ("wildcard-escape-random", "prompt: \"a __../x__\"\nprompt_sampling: random\n", "prompt", "prompt",
     ["outside the wildcards folder"]),
    ("wildcard-escape-all", "prompt: \"a __../x__\"\n", "prompt", "prompt", ["outside the wildcards folder"]),
    ("format-spec-escape", "outputs: [{png: {path: \"{id:.0}../escape-{id}.png\"}}]\n", "png", "outputs[0].png",
     ["outside the output folder"]),
    ("job-name-escape", "name: ../../../x\n", "name", "name", ["one file name"]),
    ("device-input", "conditioners: [text, {img2img: {image: /dev/zero}}]\n", "image",
     "conditioners[1].img2img.image", ["not a regular file"]),
    ("audio-not-audio", "animation: {keyframes: {0: {prompt: a}, 3: {prompt: b}}}\n"
     "outputs: [frames, {video: {audio: /etc/passwd}}]\n", "video", "outputs[1].video", ["not an audio file"]),
    ("image-not-an-image", "animation: {keyframes: {0: {image: /etc/passwd}, 3: {prompt: b}}}\n", "image",
     "animation.keyframes[0].image", ["not an image file"]),
    ("direction-not-safetensors", "edit:\n  source: {prompt: a, seed: 1}\n  directions: [{kind: file, path: "
     "/etc/passwd}]\n", "path", "edit.directions[0].path", ["not a safetensors file"]),
    ("plan-too-large", "sweep: {seed: {start: 0, count: 4000000000}, steps: [" + ", ".join(map(str, range(1, 1001)))
     + "], guidance: [" + ", ".join(map(str, range(101))) + "], width: [" + ", ".join(str(8 * i) for i in range(1, 1001))
     + "]}\n", "sweep", "sweep", ["the plan has 4.04e+17 items; the limit is 1,000,000,000,000"]),
    ("control-character", "prompt: \"a\x07b\"\n", "\x07", "", ["U+0007"]),
]


@pytest.mark.parametrize("text, needle, keypath, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_job_is_refused_with_a_located_message(tmp_path, capsys, text, needle, keypath, fragments):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    code, err = validate(path, capsys)
    assert code == 2, err
    if needle is None:  # where an expansion stops is not a place in the text: any located line
        prefix = f"{path}:"
        rows = [row for row in err.splitlines() if re.match(re.escape(prefix) + r"\d+:\d+: \S", row)]
    else:
        line, column = position(text, needle)
        prefix = f"{path}:{line}:{column}: {keypath or '(top level)'}: "
        rows = [row for row in err.splitlines() if row.startswith(prefix)]
    assert rows, f"no problem starting with {prefix!r} in:\n{err[:3000]}"
    for fragment in fragments:
        assert fragment in rows[0], f"{fragment!r} missing from {rows[0]!r}"
    assert all(len(row) < 1200 for row in err.splitlines())


def test_invalid_utf8_is_located_by_line_and_column(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"steps: 3\nprompt: \"ab\xffc\"\n")
    code, err = validate(path, capsys)
    assert code == 2
    assert f"{path}:2:12: (top level): invalid UTF-8 (byte 0xff)" in err


def test_unclosed_bracket_names_where_it_opened_and_where_parsing_failed(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("steps: 3\nsweep:\n  seed: [1, 2\nwidth: 64\n")
    code, err = validate(path, capsys)
    assert code == 2
    assert f"{path}:4:" in err and "that begins at line 3, column 9" in err


def test_fifo_input_is_refused_at_validation(tmp_path, capsys):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    path = tmp_path / "job.yaml"
    path.write_text(f"conditioners: [text, {{img2img: {{image: {fifo}}}}}]\n")
    code, err = validate(path, capsys)
    assert code == 2 and "not a regular file" in err


def test_a_fifo_in_the_wildcards_folder_is_refused_instead_of_read_forever(tmp_path, capsys):
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "colors.txt").write_text("red\nblue\n")
    os.mkfifo(tmp_path / "cards" / "shapes.txt")
    path = tmp_path / "job.yaml"
    path.write_text("wildcards: cards\nprompt: a __colors__ __shapes__\n")
    code, err = validate(path, capsys)
    assert code == 2 and f"{path}:1:1: wildcards: " in err and "shapes.txt: not a regular file" in err


def test_fifo_job_file_is_refused(tmp_path, capsys):
    fifo = tmp_path / "job.yaml"
    os.mkfifo(fifo)
    code, err = validate(fifo, capsys)
    assert code == 2 and "not a regular file" in err


@pytest.mark.parametrize("head, words", [(b"PK\x03\x04rest", "zip archive"), (b"\x80\x02}q\x00.", "a pickle"),
                                         (b"garbage!!", "not a safetensors file")])
def test_pickle_renamed_safetensors_is_reported_at_the_model_line(tmp_path, capsys, head, words):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(head + b"\x00" * 64)
    path = tmp_path / "job.yaml"
    path.write_text("steps: 3\nmodel: model.safetensors\n")
    code, err = validate(path, capsys)
    assert code == 2
    assert f"{path}:2:1: model: " in err and words in err, err


def test_plan_refuses_a_negative_offset(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("prompt: a\n")
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(path), "--offset", "-5"])
    assert exit_.value.code == 2 and "expected 0 or more" in capsys.readouterr().err


def test_info_on_a_decompression_bomb_or_a_device_reports_instead_of_crashing(tmp_path, capsys):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"  # a header claiming 100,000 x 100,000 pixels, in 57 bytes
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    assert main(["info", str(bomb), "/dev/zero"]) == 1
    err = capsys.readouterr().err
    assert f"{bomb}: cannot read: " in err and "decompression bomb" in err
    assert "/dev/zero: cannot read: not a regular file" in err


def test_thousands_of_problems_print_the_first_two_hundred(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("postprocess: [" + ", ".join(["1"] * 300) + "]\n")
    code, err = validate(path, capsys)
    rows = err.splitlines()
    assert code == 2 and rows[0] == f"{path}: 300 problems found"
    assert len(rows) == 202 and rows[-1] == f"{path}: 100 more problems found, not shown"


@pytest.mark.parametrize("field", ["prompt_slug", "template_slug", "model", "sampler", "job"])
def test_values_from_the_job_never_leave_the_folder_through_a_path_field(field):
    from sdbatch.api import Item
    from sdbatch.output import render_template

    hostile = "../../etc/passwd/.."
    item = Item(index=0, model=hostile, prompt=hostile, negative_prompt="", seed=1, steps=2, guidance=7.0,
                sampler=hostile, width=64, height=64, template=hostile)
    relpath = render_template(f"{{{field}}}/{{id}}.png", item, "png", job_name=hostile)
    assert ".." not in Path(relpath).parts and not relpath.startswith("/") and relpath.count("/") == 1
