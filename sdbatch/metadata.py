"""Generation metadata: AUTOMATIC1111's ``parameters`` text, and sdbatch's full JSON record."""

from __future__ import annotations

import json
import re
from pathlib import Path

#: A1111's field order (modules/processing.py); fields not set are left out.
A1111_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Seed resize from",
    "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio",
    "Token merging ratio hr", "Init image hash", "RNG", "NGMS", "Tiling",
)
SCHEDULE_SUFFIXES = ("Karras", "Exponential")
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value) -> str:
    """A1111's quoting: JSON-quote values that would break the ``k: v, k: v`` list."""
    text = str(value)
    if not any(ch in text for ch in ',:"\n'):
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(value: float) -> str:
    """7.0 -> '7' as A1111 shows whole numbers; anything else keeps every digit."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def a1111_fields(item, model_hash: str = "", version: str = "", plugins: dict | None = None) -> dict:
    """The A1111 fields for an item, in A1111's order, then plugins' extras, sdbatch's, then Version.

    ``plugins`` (kind -> name -> plugin object, as ``Job.plugins``) lets the item's conditioners
    and post-processors add their fields (``Plugin.a1111_fields``).
    """
    sampler, schedule = item.sampler, None
    for suffix in SCHEDULE_SUFFIXES:
        if sampler.endswith(" " + suffix):
            sampler, schedule = sampler[: -len(suffix) - 1], suffix
    clip_skip = next((u.options.get("clip_skip") for u in item.conditioners if u.name == "text"), 1)
    fields = {
        "Steps": item.steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": _number(item.guidance),
        "Seed": item.seed,
        "Size": f"{item.width}x{item.height}",
        "Model hash": model_hash or None,
        "Model": Path(item.model).stem if item.model else None,
        "Clip skip": clip_skip if clip_skip and clip_skip > 1 else None,
        "RNG": "CPU",  # sdbatch draws all noise on CPU; A1111 reproduces it with RNG: CPU
    }
    extras = {}
    family = (plugins or {}).get("family", {}).get(item.model)
    if family is not None and "cfg" not in family.capabilities:
        # guidance-distilled (FLUX.1): the scale is an input, not CFG; Forge writes it this way
        fields["CFG scale"] = "1"
        extras["Distilled CFG Scale"] = _number(item.guidance)
    for key, value in plugin_fields(item, plugins or {}):
        (fields if key in A1111_ORDER else extras)[key] = value
    ordered = {k: fields[k] for k in A1111_ORDER if fields.get(k) is not None}
    ordered.update({k: v for k, v in extras.items() if v is not None})
    ordered.update(_animation_fields(item))
    ordered["sdbatch id"] = item.id
    if version:
        ordered["Version"] = f"sdbatch {version}"
    return ordered


def plugin_fields(item, plugins: dict) -> list:
    """(name, value) pairs from the item's conditioners, then post-processors, in job order."""
    pairs, counters = [], {}
    for kind, uses in (("conditioner", item.conditioners), ("postprocessor", item.postprocess)):
        for use in uses:
            plugin = plugins.get(kind, {}).get(use.name)
            if plugin is None:
                continue
            for key, value in plugin.a1111_fields(item, plugin.parse_options(use.options)):
                if "{n}" in key:  # repeated units (ControlNet 0, ControlNet 1) count from 0
                    counters[key] = counters.get(key, -1) + 1
                    key = key.replace("{n}", str(counters[key]))
                pairs.append((key, _number(value) if isinstance(value, float) else value))
    return pairs


def _animation_fields(item) -> dict:
    """Where an animation frame sits: its frame, and the keyframe it moves towards."""
    animation = item.extra.get("animation")
    if not animation:
        return {}
    fields = {"Frame": animation["frame"]}
    if animation.get("t"):
        end = animation["to"]
        fields.update({"Interpolation": f"{animation['t']:.4f}", "Next prompt": end["prompt"],
                       "Next seed": end["seed"]})
    return fields


def format_parameters(prompt: str, negative_prompt: str, fields: dict) -> str:
    """``{prompt}\\nNegative prompt: {negative}\\n{k: v, ...}`` exactly as A1111 writes it."""
    params = ", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(params)
    return "\n".join(lines)


def parse_parameters(text: str) -> dict:
    """Read A1111 ``parameters`` text back: prompt, negative prompt and every field (as text)."""
    lines = text.strip().split("\n")
    params = {}
    last = lines[-1] if lines else ""
    if len(_FIELD.findall(last)) >= 3:
        for key, value in _FIELD.findall(last):
            value = value.strip()
            if value.startswith('"') and value.endswith('"'):
                value = json.loads(value)
            params[key.strip()] = value
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(line)
    return {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative), **params}


def versions() -> dict:
    """Versions of the libraries that decide pixels, recorded with every output."""
    import importlib.metadata as md
    import platform

    result = {"python": platform.python_version()}
    for name in ("sdbatch", "torch", "diffusers", "transformers"):
        try:
            result[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return result


def read_image_metadata(path: str | Path) -> dict:
    """The A1111 parameters text and sdbatch record stored in an image file, if any."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get("parameters")
        record = image.info.get("sdbatch") or read_record_xmp(image.info.get("xmp"))
        if text is None:
            comment = image.getexif().get_ifd(0x8769).get(0x9286)
            text = decode_user_comment(comment) if comment else None
    result = {"parameters": text, "record": json.loads(record) if record else None}
    if text:
        result["parsed"] = parse_parameters(text)
    return result


#: The XMP namespace of sdbatch's record in JPEG and WebP files (PNG keeps it in a text chunk).
XMP_NAMESPACE = "https://github.com/sdbatch/sdbatch/ns/record/1.0/"
_XMP_RECORD = re.compile(r"<sdbatch:record>(.*?)</sdbatch:record>", re.S)


def record_xmp(record: str) -> bytes:
    """An XMP packet holding the JSON record as one property (JPEG's XMP segment holds ~64 KB)."""
    from xml.sax.saxutils import escape

    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:sdbatch="{XMP_NAMESPACE}">'
            f'<sdbatch:record>{escape(record)}</sdbatch:record>'
            '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode("utf-8")


def read_record_xmp(xmp) -> str | None:
    """The JSON record from an XMP packet that ``record_xmp`` wrote (found by pattern: no XML parser
    runs on a file's bytes)."""
    import html

    if not xmp:
        return None
    text = xmp.decode("utf-8", errors="replace") if isinstance(xmp, bytes) else str(xmp)
    match = _XMP_RECORD.search(text)
    return html.unescape(match.group(1)) if match else None


def encode_user_comment(text: str) -> bytes:
    """EXIF UserComment as A1111 writes it (piexif's 'unicode' encoding: UTF-16 big-endian)."""
    return b"UNICODE\x00" + text.encode("utf-16-be")


def decode_user_comment(raw) -> str:
    if isinstance(raw, str):
        return raw
    prefix, body = raw[:8], raw[8:]
    if prefix.startswith(b"UNICODE"):
        # piexif writes big-endian, some tools little-endian. Mostly-ASCII text has its zero
        # bytes first in each pair when big-endian and second when little-endian.
        zeros_first = body[0::2].count(0)
        zeros_second = body[1::2].count(0)
        codec = "utf-16-le" if zeros_second > zeros_first else "utf-16-be"
        return body.decode(codec, errors="replace")
    return body.decode("utf-8", errors="replace")
