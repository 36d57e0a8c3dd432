"""A before/after strip of an animation: every Nth frame of each run, one labelled row per run.

    .venv/bin/python scripts/animation_strip.py OUT_UNIFORM OUT_EVEN ... docs/animation-timing.png [--every 4]
        [--labels "uniform,even per segment,..."]

Each OUT is a run's folder (frames in frames/, in frame order); each row is labelled with
the folder's name (or its --labels entry) and its smoothness report's max/median
consecutive-frame change (mean |RGB| difference, 0-255, of consecutive frames).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

LABEL = 150  # pixels of the label column


def row(out: Path, every: int, name: str) -> tuple[list, str]:
    frames = sorted((out / "frames").rglob("*.png"))
    smooth = next((out / "videos").glob("*.smoothness.json"), None)
    ratio = json.loads(smooth.read_text())["max_over_median"] if smooth else None
    label = f"{name}\nmax/median {ratio:.1f}" if ratio is not None else name
    return [Image.open(f).convert("RGB") for f in frames[::every]], label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--labels", default=None, help="comma-separated row labels (default: the folders' names)")
    args = parser.parse_args()
    names = args.labels.split(",") if args.labels else [out.name for out in args.runs]
    if len(names) != len(args.runs):
        parser.error(f"--labels names {len(names)} rows for {len(args.runs)} runs")
    rows = [row(out, args.every, name) for out, name in zip(args.runs, names)]
    width, height = rows[0][0][0].size
    strip = Image.new("RGB", (LABEL + width * max(len(r) for r, _ in rows), height * len(rows)), "white")
    draw = ImageDraw.Draw(strip)
    for y, (images, label) in enumerate(rows):
        draw.multiline_text((6, y * height + height // 2 - 12), label, fill="black")
        for x, image in enumerate(images):
            strip.paste(image, (LABEL + x * width, y * height))
    args.target.parent.mkdir(parents=True, exist_ok=True)
    strip.save(args.target, optimize=True)
    print(f"{args.target}: {strip.size[0]}x{strip.size[1]}")


if __name__ == "__main__":
    main()
