"""What a resumed run's driver holds for the items already finished: memory and load time.

    .venv/bin/python bench/bench_manifest.py [--items 1000000]

Writes a manifest of N dataset-like items (one staged image each), then, each in a fresh
subprocess so peak memory (VmHWM) is its own: opens it with sdbatch's OutputDir (the
compact index a run uses to skip finished items) and, as the baseline, parses every line
into dicts kept in memory (what holding the entries themselves costs). File existence
checks are skipped in both, so the figures are the index alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
import json, sys, time

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

root, mode = sys.argv[1], sys.argv[2]
start_mb, t0 = peak_mb(), time.perf_counter()
if mode == "sdbatch":
    import sdbatch.output as output
    output.Path.is_file = lambda self: True  # the index alone, not the stat calls
    start_mb = peak_mb()
    t0 = time.perf_counter()
    out = output.OutputDir(root)
    count = len(out)
    out.is_done(next(iter(out._done)))
else:
    with open(root + "/manifest.jsonl", "rb") as handle:
        kept = {d["id"]: d for d in map(json.loads, handle)}
    count = len(kept)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": peak_mb(), "added_mb": peak_mb() - start_mb,
                  "count": count}))
"""


def write_manifest(root: Path, items: int) -> None:
    (root / "run_files.json").write_text("[]")
    with open(root / "manifest.jsonl", "w") as handle:
        for i in range(items):
            item_id = hashlib.sha256(str(i).encode()).hexdigest()[:16]
            item = {"id": item_id, "index": i, "model": "sdbatch-tiny", "seed": i, "steps": 20, "guidance": 5.0,
                    "prompt": "a large red circle on the left, on a white background", "negative_prompt": "",
                    "sampler": "DPM++ 2M", "width": 64, "height": 64, "conditioners": [{"text": {"clip_skip": 1}}],
                    "postprocess": [], "extra": {}, "axes": {"seed": i}, "template": "a {large|small} circle"}
            files = [{"path": f".dataset-staging/{i // 1000:05d}/{item_id}.png",
                      "sha256": hashlib.sha256(item_id.encode()).hexdigest(), "writer": "webdataset"}]
            handle.write(json.dumps({"id": item_id, "index": i, "files": files, "item": item, "seconds": 0.1,
                                     "extra": {}, "writers": ["webdataset"]}) + "\n")


def probe(root: Path, mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, str(root), mode], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_manifest(root, args.items)
        size_mb = (root / "manifest.jsonl").stat().st_size / 1e6
        base, ours = probe(root, "dicts"), probe(root, "sdbatch")
    print(f"manifest: {args.items:,} items, {size_mb:.0f} MB")
    print(f"baseline (entries as dicts): {base['added_mb']:.0f} MB, {base['seconds']:.1f} s")
    print(f"sdbatch OutputDir index:     {ours['added_mb']:.0f} MB, {ours['seconds']:.1f} s "
          f"({ours['added_mb'] * 2**20 / args.items:.0f} bytes/item)")
    print(f"ratio: memory {ours['added_mb'] / base['added_mb']:.2f}x, time {ours['seconds'] / base['seconds']:.2f}x "
          "of the baseline")


if __name__ == "__main__":
    main()
