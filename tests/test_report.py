"""`sdbatch report`: the page's content, and the page itself working in a real headless Chromium.

Chromium is driven with two plain command lines, no browser-automation library:
``--dump-dom`` on a copy of the page with a probe script injected by this test (it
records errors from the first moment, clicks through the page on load and writes its
findings into the DOM), and ``--screenshot``. The probe lives here, not in the library.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from sdbatch.cli import main
from sdbatch.report import read_run, write_report

INJECTION = "</script><script>window.pwned=1</script>"
PROMPTS = ["a red circle <b>bold</b> & co", f"a blue square {INJECTION}"]

# Records errors (script errors, failed loads, console.error) before the page's own script runs.
PROBE = """<script>
window.__problems = [];
addEventListener("error", (e) => __problems.push(e.message || ("cannot load " + (e.target.src || e.target.href))), true);
addEventListener("unhandledrejection", (e) => __problems.push("unhandled rejection: " + e.reason));
const __consoleError = console.error;
console.error = (...args) => { __problems.push("console.error: " + args.join(" ")); __consoleError(...args); };
</script>"""

# Clicks through the page once everything has loaded, then writes what it saw into <pre id=selftest>.
CHECKS = """<script>
addEventListener("load", () => {
  const result = {};
  const shown = () => document.querySelectorAll("#gallery .card:not([hidden])").length;
  const seedChip = () => document.querySelector('#filters button[data-axis="seed"]');
  const images = [...document.images].filter((img) => img.getAttribute("src"));
  result.images = images.length;
  result.broken = images.filter((img) => !(img.complete && img.naturalWidth > 0)).map((img) => img.alt);
  result.before = shown();
  seedChip().click();
  result.afterClick = shown();
  result.pressed = seedChip().getAttribute("aria-pressed");
  result.count = document.getElementById("count").textContent;
  seedChip().click();
  result.restored = shown();
  document.getElementById("show-grid").click();
  result.gridImages = document.querySelectorAll("#grid td img").length;
  result.galleryDisplayInGrid = getComputedStyle(document.getElementById("gallery")).display;
  result.hashInGrid = location.hash;
  result.gridHeaders = [...document.querySelectorAll("#grid th")].map((th) => th.textContent).filter(Boolean);
  document.getElementById("show-gallery").click();
  document.querySelector("#gallery .card img").click();
  result.detailOpen = document.getElementById("detail").open;
  result.detailPrompt = document.querySelector("#detail-params td").textContent;
  result.pwned = window.pwned === 1;
  result.injectedElements = document.querySelectorAll("body b").length;
  result.problems = window.__problems;
  const pre = document.createElement("pre");
  pre.id = "selftest";
  pre.textContent = JSON.stringify(result);
  document.body.append(pre);
});
</script>"""


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def rendered(tiny_model, tmp_path_factory) -> Path:
    """A real 2 prompts x 2 seeds run (2 steps) with an X/Y grid; prompts carry HTML."""
    from sdbatch.job import load_job
    from sdbatch.plugins import load_registry
    from sdbatch.run import LocalExecutor

    folder = tmp_path_factory.mktemp("report")
    job_file = folder / "job.yaml"
    job_file.write_text(json.dumps({
        "name": "report-demo", "model": str(tiny_model), "steps": 2,
        "sweep": {"prompt": PROMPTS, "seed": [1, 2]},
        "outputs": ["png", {"xyz_grid": {"x": "prompt", "y": "seed"}}],
    }))
    registry = load_registry()
    LocalExecutor(load_job(job_file, registry), registry, folder / "out", quiet=True).run()
    return folder / "out"


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless Chromium: .ci/run installs Debian's `chromium` when run as root or with sudo; "
                "or run `apt-get install -y chromium`")


def run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with a throwaway profile; nothing leaves the machine (file:// pages only)."""
    command = [chromium, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
               "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- in Chromium
@pytest.mark.slow
def test_report_works_in_chromium(rendered, chromium, tmp_path):
    page = write_report(rendered)
    probed = page.with_name("probed.html")  # beside the page, so relative links resolve the same
    text = page.read_text(encoding="utf-8")
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1).replace("</body>", CHECKS + "</body>", 1),
                      encoding="utf-8")
    try:
        dumped = run_chromium(chromium, tmp_path / "profile", "--dump-dom", probed.as_uri())
    finally:
        probed.unlink()
    found = re.search(r'<pre id="selftest">(.*?)</pre>', dumped.stdout, flags=re.S)
    assert found, f"the probe did not report; chromium said: {dumped.stderr[-2000:]}"
    result = json.loads(html.unescape(found.group(1)))

    assert result["problems"] == []  # no script error, console error or failed load
    assert result["images"] == 5 and result["broken"] == []  # 4 thumbnails and the grid, all decoded
    assert (result["before"], result["afterClick"], result["restored"]) == (4, 2, 4)
    assert result["pressed"] == "false" and result["count"] == "Showing 2 of 4"
    assert result["gridImages"] == 4 and result["galleryDisplayInGrid"] == "none"
    assert result["hashInGrid"] == "#view=grid"  # a link that reopens the grid view
    assert {"seed: 1", "seed: 2", f"prompt: {PROMPTS[1]}"} <= set(result["gridHeaders"])
    assert result["detailOpen"] and result["detailPrompt"] in PROMPTS
    assert not result["pwned"] and result["injectedElements"] == 0  # prompts stayed text


@pytest.mark.slow
def test_report_screenshot(rendered, chromium, tmp_path):
    page = write_report(rendered, tmp_path / "elsewhere" / "report.html")  # links still reach the run
    shot = tmp_path / "report.png"
    done = run_chromium(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,900",
                        page.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 900)
        stats = ImageStat.Stat(image.convert("RGB"))
        assert max(stats.stddev) > 20  # not a blank page: thumbnails and text
        assert len(image.convert("RGB").getcolors(1 << 20)) > 500


# ---------------------------------------------------------------- the page's content
def _fake_run(folder: Path) -> Path:
    """An output folder written by hand: two items, one failure, a grid, a video, an interrupted run."""
    (folder / "img").mkdir(parents=True)
    lines = []
    for index, (colour, seed) in enumerate([("red", 1), ("blue", 2)]):
        Image.new("RGB", (32, 32), colour).save(folder / "img" / f"{index}.png")
        item = {"prompt": f"a {colour} {INJECTION}", "seed": seed, "steps": 2, "guidance": 7.5, "width": 32,
                "height": 32, "axes": {"seed": seed, "guidance": 7.5}}
        lines.append(json.dumps({"id": f"id{index}", "index": index, "item": item,
                                 "files": [{"path": f"img/{index}.png", "sha256": "x", "writer": "png", "image": True}]}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + '\n{"id": "cut')  # a line cut by kill -9
    (folder / "failures.jsonl").write_text(json.dumps({"id": "id9", "error": "ValueError: <i>no</i>"}) + "\n"
                                           + json.dumps({"id": "id1", "error": "fixed since"}) + "\n")
    Image.new("RGB", (64, 32), "green").save(folder / "grid.png")
    (folder / "anim.webm").write_bytes(b"not really a video")
    (folder / "run_files.json").write_text(json.dumps(["grid.png", "anim.webm", "cat.csv"]))
    return folder


def test_report_content_is_escaped_and_complete(tmp_path):
    run_dir = _fake_run(tmp_path / "run dir")
    page = write_report(run_dir, tmp_path / "pages" / "r.html")
    text = page.read_text(encoding="utf-8")
    assert "window.pwned" in text and "<script>window.pwned" not in text and "<i>no</i>" not in text
    assert "ValueError: &lt;i&gt;no&lt;/i&gt;" in text and "fixed since" not in text  # id1 finished later
    assert '<source src="../run%20dir/anim.webm" type="video/webm">' in text
    assert '<a href="../run%20dir/cat.csv">cat.csv</a>' in text
    assert "No summary.json" in text
    data = json.loads(re.search(r'id=sdbatch-data>(.*?)</script>', text, flags=re.S).group(1))
    assert [item["href"] for item in data["items"]] == ["../run%20dir/img/0.png", "../run%20dir/img/1.png"]
    assert all(item["thumb"].startswith("data:image/jpeg;base64,") and item["small"] for item in data["items"])
    assert data["axes"] == [{"name": "seed", "values": [{"key": "1", "label": "1"}, {"key": "2", "label": "2"}]},
                            {"name": "guidance", "values": [{"key": "7.5", "label": "7.5"}]}]
    assert read_run(run_dir).name == "run dir"


def test_report_command(tmp_path, capsys):
    run_dir = _fake_run(tmp_path / "run")
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").is_file()
    assert capsys.readouterr().out.strip() == f"report written to {run_dir / 'report.html'}"
    (run_dir / "summary.json").write_text(json.dumps({"total": 3, "rendered": 2, "seconds": 1.5,
                                                       "images_per_second": 1.3333, "notes": {"video": "<skipped>"}}))
    assert main(["report", str(run_dir), "-o", str(tmp_path / "again.html")]) == 0
    text = (tmp_path / "again.html").read_text(encoding="utf-8")
    assert "<dd>1.5 s</dd>" in text and "<dd>1.33</dd>" in text and "No summary.json" not in text
    assert "&quot;&lt;skipped&gt;&quot;" in text
    assert main(["report", str(run_dir), "-o", str(tmp_path / "one.html"), "--max-items", "1"]) == 0
    text = (tmp_path / "one.html").read_text(encoding="utf-8")
    assert "shows the first 1 of 2 finished items" in text and text.count('"id":"id') == 1
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nothing")]) == 1
    assert "has no manifest.jsonl: not an sdbatch output folder" in capsys.readouterr().err


def test_a_video_shows_its_per_frame_change_beside_it(tmp_path):
    run_dir = _fake_run(tmp_path / "run")
    sidecar = {"steps": [1.0, 1.2, 9.0, 1.1], "median": 1.15, "max": 9.0, "max_over_median": 7.83,
               "jumps": [3], "detours": [2]}
    (run_dir / "anim.smoothness.json").write_text(json.dumps(sidecar))
    text = write_report(run_dir, tmp_path / "r.html").read_text(encoding="utf-8")
    row = re.search(r"<div class=video-row>(.*?)</div>", text, flags=re.S).group(1)
    assert "<video" in row and "<svg" in row  # the plot sits beside the player
    points = re.search(r'<polyline points="([^"]+)"', row).group(1).split()
    assert len(points) == 4 and min(points, key=lambda p: float(p.split(",")[1])) == points[2]  # frame 3 highest
    assert row.count("<circle") == 1 and "frame 3: change 9.00" in row  # the jump
    assert row.count("<rect") == 1 and "frame 2: detour" in row
    assert "max/median 7.83; 1 jumps, 1 detours" in row
