#!/usr/bin/env bash
# Re-render the README's pictures from the example jobs (run after sdbatch-tiny or its
# ControlNets change). CPU, about two minutes, plus the animation strip (three 49-frame renders
# and two pre-passes, 10 minutes or more). Needs chromium for the report screenshot.
#   bash scripts/docs_images.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() { .venv/bin/sdbatch run "jobs/$1.yaml" -o "$out/$1" >/dev/null; }

run quickstart
cp "$out"/quickstart/grids/quickstart-*.png docs/quickstart-grid.png
.venv/bin/sdbatch report "$out/quickstart" >/dev/null
if command -v chromium >/dev/null; then
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,900 \
    --screenshot=docs/report-quickstart.png "file://$out/quickstart/report.html" 2>/dev/null
fi

run edit
strips=("$out"/edit/strips/edit-*.png)
cp "${strips[0]}" docs/edit-strip-red-to-blue.png     # prompt-difference direction first
cp "${strips[1]}" docs/edit-strip-local-basis.png     # then the first local-basis direction

run controlnet
cp "$out"/controlnet/grids/controlnet-*1.png docs/controlnet-grid.png   # seed 1
# The animation timing strip: uniform (before), even per segment and even over the video (after),
# rendered by the bench.
.venv/bin/python bench/bench_animation.py --out "$out/animation" >/dev/null
.venv/bin/python scripts/animation_strip.py "$out/animation/uniform" "$out/animation/segment" "$out/animation/video" \
    docs/animation-timing.png --every 3 --labels "uniform,even (segment),even (video)"

ls -l docs/*.png
