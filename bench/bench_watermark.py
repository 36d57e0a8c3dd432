"""How often the invisible watermark reads back: image sizes x JPEG quality x method.

    .venv/bin/python bench/bench_watermark.py [--images 16]

Renders N sdbatch-tiny images (64x64, 20 steps, varied prompts and seeds), enlarges each
with Lanczos to every size, marks it ("sdbatch", 56 bits) with each method, stores it as PNG
and as JPEG at several qualities, and reads it back. Prints, per case, the images whose
mark reads back exactly and the mean wrong bits; the baseline row is the unmarked image
(about half its bits are wrong: what "no mark" looks like).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = (256, 384, 512)
QUALITIES = (None, 95, 90, 80, 70)  # None: PNG
METHODS = ("dwtDctSvd", "dwtDct")
TEXT = b"sdbatch"


def render(count: int, folder: Path) -> list[Path]:
    job = folder / "job.yaml"
    job.write_text("name: watermark-bench\nprompt: 'a {large|small} {red|blue|green|yellow} {circle|square} "
                   "{on the left|in the centre}, on a {white|black} background'\nprompt_sampling: random\n"
                   f"sweep: {{seed: {{start: 0, count: {count}}}}}\noutputs: [{{png: {{path: '{{index}}.png'}}}}]\n")
    subprocess.run([sys.executable, "-m", "sdbatch", "run", str(job), "-o", str(folder / "out"), "-q"], check=True)
    return sorted((folder / "out").glob("*.png"))


def bit_errors(read: bytes, expected: bytes) -> int:
    return sum(bin(a ^ b).count("1") for a, b in zip(read.ljust(len(expected), b"\0"), expected))


def stored(image, quality):
    from PIL import Image

    if quality is None:
        return image
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def main() -> None:
    from PIL import Image

    from sdbatch_plugins.postprocessors import Watermark, WatermarkOptions, decode_watermark

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        sources = [Image.open(p).convert("RGB") for p in render(args.images, Path(folder))]
    print(f"{'method':10} {'size':>5} {'stored as':>10} {'exact':>7} {'wrong bits':>10}")
    for method in METHODS:
        for size in SIZES:
            large = [s.resize((size, size), Image.Resampling.LANCZOS) for s in sources]
            if method == METHODS[0]:
                errors = [bit_errors(decode_watermark(im, len(TEXT), method), TEXT) for im in large]
                print(f"{'(unmarked)':10} {size:5} {'PNG':>10} {sum(e == 0 for e in errors):3}/{len(errors):<3} "
                      f"{sum(errors) / len(errors):10.1f}")
            marked = [Watermark().apply(im, WatermarkOptions(text=TEXT.decode(), method=method), None) for im in large]
            for quality in QUALITIES:
                errors = [bit_errors(decode_watermark(stored(im, quality), len(TEXT), method), TEXT) for im in marked]
                shown = "PNG" if quality is None else f"JPEG q{quality}"
                print(f"{method:10} {size:5} {shown:>10} {sum(e == 0 for e in errors):3}/{len(errors):<3} "
                      f"{sum(errors) / len(errors):10.1f}", flush=True)


if __name__ == "__main__":
    main()
