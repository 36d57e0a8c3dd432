"""The run report: one static HTML page about an output folder, to look at rather than read.

``sdbatch report OUT_DIR`` reads only the folder (manifest.jsonl, summary.json,
failures.jsonl, run_files.json, job.yaml and the images) and writes ``report.html``:
a thumbnail gallery with each item's parameters, filters by every sweep axis, a grid
of two chosen axes, the run-level files (grids, videos) and the run's summary.

Thumbnails are embedded as data URIs, so the page is one file that works opened from
disk, copied elsewhere or attached to a message, and never mixes report files with the
run's outputs. Full-size images and videos are linked by relative path (too large to
embed). Nothing is fetched from a network: plain JS and CSS inline. Every text from the
run (prompts are user input) reaches the page either escaped by ``html.escape`` or as
JSON read by the script and shown with ``textContent``, never parsed as HTML.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SdbatchError
from .output import MANIFEST, RUN_FILES, atomic_write
from .run import FAILURES, SUMMARY

VIDEO_TYPES = {".mp4": "video/mp4", ".webm": "video/webm"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


@dataclass
class RunFolder:
    """What the report shows, as read from an output folder."""

    root: Path
    entries: list  # manifest lines (dicts), in plan order
    summary: dict | None
    failures: list  # failures.jsonl lines of items that have not finished since
    run_files: list  # relative paths of grids, videos, catalogues
    job_text: str = ""
    name: str = ""
    axes: list = field(default_factory=list)  # [(axis name, [values in plan order])]


# ---------------------------------------------------------------- reading the folder
def read_run(out_dir) -> RunFolder:
    """Read an output folder; a folder without a manifest is an error."""
    root = Path(out_dir)
    if not (root / MANIFEST).is_file():
        raise SdbatchError(f"{root} has no {MANIFEST}: not an sdbatch output folder, or nothing finished yet")
    entries = sorted(_read_jsonl(root / MANIFEST, by_id=True), key=lambda e: e.get("index", 0))
    finished = {e["id"] for e in entries}
    failures = [f for f in _read_jsonl(root / FAILURES, by_id=True) if f.get("id") not in finished]
    job_text = _read_text(root / "job.yaml")
    return RunFolder(root, entries, _read_json(root / SUMMARY), failures, _read_json(root / RUN_FILES) or [],
                     job_text, _job_name(job_text) or root.resolve().name, _axes(entries))


def _read_jsonl(path: Path, by_id: bool = False) -> list[dict]:
    """JSON lines; a line cut by a kill is skipped; with ``by_id`` the last line per id wins."""
    records = {}
    for number, line in enumerate(_read_text(path).splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[record.get("id", number) if by_id else number] = record
    return list(records.values())


def _read_json(path: Path):
    text = _read_text(path)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def _job_name(job_text: str) -> str:
    import yaml

    try:
        data = yaml.safe_load(job_text)
    except yaml.YAMLError:
        return ""
    return str(data.get("name") or "") if isinstance(data, dict) else ""


def _axes(entries: list) -> list:
    """Every sweep axis the items record, with its values in order of first appearance."""
    axes: dict[str, dict] = {}
    for entry in entries:
        for name, value in entry.get("item", {}).get("axes", {}).items():
            axes.setdefault(name, {}).setdefault(value_key(value), value)
    return [(name, list(values.values())) for name, values in axes.items()]


def value_key(value) -> str:
    """One string per axis value, the same in Python and in the page."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def value_label(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------- images
def data_uri(path: Path, size: int) -> tuple[str, int] | None:
    """A JPEG thumbnail of at most ``size`` pixels a side as a data URI, with its width; None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85)
    except (OSError, UnidentifiedImageError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), image.width


def link(root: Path, relpath: str, page_dir: Path) -> str:
    """A URL for an output file relative to the page, so the pair works from disk."""
    target = os.path.relpath((root / relpath).resolve(), page_dir.resolve())
    return urllib.parse.quote(Path(target).as_posix())


# ---------------------------------------------------------------- the page's data
def item_card(entry: dict, root: Path, page_dir: Path, thumb_size: int) -> dict:
    """What the page needs about one finished item: thumbnail, link, axis keys, parameters."""
    item = entry.get("item", {})
    image = next((f["path"] for f in entry.get("files", []) if f.get("image")), None)
    thumb = data_uri(root / image, thumb_size) if image else None
    return {
        "id": entry["id"],
        "thumb": thumb[0] if thumb else None,
        "small": bool(thumb and thumb[1] < 128),  # shown enlarged with crisp pixels
        "href": link(root, image, page_dir) if image else None,
        "axes": {name: value_key(value) for name, value in item.get("axes", {}).items()},
        "title": f"{item.get('prompt', '')}\nseed {item.get('seed')}, {item.get('steps')} steps, "
                 f"CFG {item.get('guidance')}, {item.get('sampler')}",
        "params": parameters(entry),
    }


def parameters(entry: dict) -> list[list[str]]:
    """The item's parameters as (label, text) rows for the detail view."""
    item = entry.get("item", {})

    def uses(key: str) -> str:
        return ", ".join(json.dumps(use, ensure_ascii=False) for use in item.get(key, [])) or "none"

    rows = [
        ("Prompt", item.get("prompt", "")), ("Negative prompt", item.get("negative_prompt", "")),
        ("Seed", item.get("seed")), ("Steps", item.get("steps")), ("CFG scale", item.get("guidance")),
        ("Sampler", item.get("sampler")), ("Size", f"{item.get('width')}x{item.get('height')}"),
        ("Model", item.get("model")), ("Model hash", item.get("model_hash", "")),
        ("Conditioners", uses("conditioners")), ("Post-processing", uses("postprocess")),
        ("Axes", ", ".join(f"{k}: {value_label(v)}" for k, v in item.get("axes", {}).items()) or "none"),
        ("Files", ", ".join(f["path"] for f in entry.get("files", []))),
        ("Seconds", f"{entry.get('seconds', 0):.3f}"), ("ID", entry["id"]),
    ]
    return [[label, "" if value is None else str(value)] for label, value in rows]


def page_data(run: RunFolder, page_dir: Path, thumb_size: int, max_items: int | None = None) -> dict:
    """The JSON the page's script reads: the first ``max_items`` items and every axis."""
    return {
        "items": [item_card(entry, run.root, page_dir, thumb_size) for entry in run.entries[:max_items]],
        "axes": [{"name": name, "values": [{"key": value_key(v), "label": value_label(v)} for v in values]}
                 for name, values in run.axes],
    }


def script_json(data) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' can end the element or start markup."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


# ---------------------------------------------------------------- the page's static parts
def summary_html(run: RunFolder) -> str:
    """The run's numbers as definition-list cards."""
    s = run.summary or {}
    cards = [("finished items", len(run.entries)), ("planned (last run)", s.get("total", "?")),
             ("rendered (last run)", s.get("rendered", "?")), ("already done", s.get("already_done", "?")),
             ("failed", len(run.failures)), ("time", f"{s['seconds']:.1f} s" if "seconds" in s else "?"),
             ("images/s", f"{s['images_per_second']:.2f}" if "images_per_second" in s else "?"),
             ("model loads", s.get("model_loads", "?"))]
    body = "".join(f"<div><dt>{html.escape(label)}</dt><dd>{html.escape(str(value))}</dd></div>"
                   for label, value in cards)
    note = "" if run.summary else "<p class=note>No summary.json: the last run did not finish.</p>"
    if s.get("notes"):  # what writers reported (e.g. videos skipped, smoothness)
        notes = html.escape(json.dumps(s["notes"], indent=1, ensure_ascii=False))
        note += f"<details class=note><summary>Notes from writers</summary><pre>{notes}</pre></details>"
    return f"<dl class=summary>{body}</dl>{note}"


def failures_html(run: RunFolder) -> str:
    if not run.failures:
        return ""
    rows = "".join(f"<li><code>{html.escape(str(f.get('id', '?')))}</code> {html.escape(str(f.get('error', '')))}</li>"
                   for f in run.failures)
    return f"<details class=failures open><summary>{len(run.failures)} failed item(s)</summary><ul>{rows}</ul></details>"


def run_files_html(run: RunFolder, page_dir: Path, thumb_size: int) -> str:
    """Grids as linked thumbnails, videos as players, anything else as a link."""
    parts = []
    for relpath in run.run_files:
        href, name = html.escape(link(run.root, relpath, page_dir)), html.escape(relpath)
        suffix = Path(relpath).suffix.lower()
        thumb = data_uri(run.root / relpath, thumb_size * 4) if suffix in IMAGE_SUFFIXES else None
        if suffix in VIDEO_TYPES:
            plot = change_plot(_read_json(run.root / (relpath.rsplit(".", 1)[0] + ".smoothness.json")))
            parts.append(f'<div class=video-row><figure><video controls preload=metadata><source src="{href}" '
                         f'type="{VIDEO_TYPES[suffix]}"></video><figcaption>{name}</figcaption></figure>'
                         f"{plot}</div>")
        elif thumb:
            parts.append(f'<figure><a href="{href}"><img src="{thumb[0]}" alt="{name}"></a>'
                         f"<figcaption>{name}</figcaption></figure>")
        else:
            parts.append(f'<p><a href="{href}">{name}</a></p>')
    return f"<section class=run-files><h2>Run files</h2>{''.join(parts)}</section>" if parts else ""


def change_plot(report: dict | None, width: int = 320, height: int = 96) -> str:
    """A video's per-frame change (its smoothness sidecar) as an inline SVG: a line, jumps and detours marked."""
    steps = (report or {}).get("steps") or []
    if not steps:
        return ""
    top = max(steps) or 1.0
    x = lambda frame: round(4 + (width - 8) * frame / len(steps), 1)  # noqa: E731 - step i ends at frame i+1
    y = lambda value: round(height - 14 - (height - 22) * value / top, 1)  # noqa: E731
    line = " ".join(f"{x(i + 1)},{y(v)}" for i, v in enumerate(steps))
    detours = "".join(f'<rect x="{x(f - 0.5)}" y="4" width="{x(1) - x(0)}" height="{height - 18}" fill="#f4c7a1">'
                      f"<title>frame {f}: detour</title></rect>" for f in report.get("detours", []))
    jumps = "".join(f'<circle cx="{x(f)}" cy="{y(steps[f - 1])}" r="3" fill="#c0392b">'
                    f"<title>frame {f}: change {steps[f - 1]:.2f}</title></circle>" for f in report.get("jumps", []))
    ratio = report.get("max_over_median")
    caption = html.escape(f"change per frame (mean |RGB|, 0-255): max {report.get('max', 0):.2f}, median "
                          f"{report.get('median', 0):.2f}, max/median {ratio if ratio is not None else '-'}; "
                          f"{len(report.get('jumps', []))} jumps, {len(report.get('detours', []))} detours")
    return (f'<figure class=change-plot><svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{caption}">{detours}<polyline points="{line}" fill="none" stroke="#2c3e50" '
            f'stroke-width="1.5"/>{jumps}<text x="4" y="{height - 2}" font-size="10">frame 0</text>'
            f'<text x="{width - 4}" y="{height - 2}" font-size="10" text-anchor="end">{len(steps)}</text></svg>'
            f"<figcaption>{caption}</figcaption></figure>")


def render_page(run: RunFolder, page_dir: Path, thumb_size: int = 256, max_items: int | None = None) -> str:
    """The whole HTML page; the gallery holds at most ``max_items`` items (None: all)."""
    title = html.escape(f"sdbatch report: {run.name}")
    job = (f"<details><summary>job.yaml</summary><pre>{html.escape(run.job_text)}</pre></details>"
           if run.job_text else "")
    summary = summary_html(run)
    if max_items is not None and len(run.entries) > max_items:
        summary += (f"<p class=note>The gallery shows the first {max_items} of {len(run.entries)} finished items "
                    "(sdbatch report --max-items).</p>")
    return PAGE.format(
        title=title, style=STYLE, script=SCRIPT, summary=summary, failures=failures_html(run),
        run_files=run_files_html(run, page_dir, thumb_size), job=job,
        data=script_json(page_data(run, page_dir, thumb_size, max_items)),
    )


def write_report(out_dir, target=None, thumb_size: int = 256, max_items: int | None = 5000) -> Path:
    """Write the report page (default: OUT_DIR/report.html) and return its path.

    ``max_items`` bounds the page's size (each thumbnail is a few kilobytes); None shows all.
    """
    if not 16 <= thumb_size <= 2048:
        raise SdbatchError(f"thumbnail size must be between 16 and 2048 pixels, got {thumb_size}")
    if max_items is not None and max_items < 1:
        raise SdbatchError(f"--max-items must be at least 1, got {max_items}")
    run = read_run(out_dir)
    page = Path(target) if target else run.root / "report.html"
    atomic_write(page, render_page(run, page.parent, thumb_size, max_items).encode("utf-8"))
    return page


PAGE = """<!doctype html>
<html lang=en>
<head>
<meta charset=utf-8>
<meta name=viewport content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header><h1>{title}</h1>{summary}{failures}</header>
<nav class=toolbar>
  <span role=tablist>
    <button type=button role=tab id=show-gallery aria-selected=true>Gallery</button>
    <button type=button role=tab id=show-grid aria-selected=false>Grid</button>
  </span>
  <label>X <select id=grid-x></select></label>
  <label>Y <select id=grid-y></select></label>
  <span id=count aria-live=polite></span>
</nav>
<section class=filters id=filters aria-label="Filters by sweep axis"></section>
<main>
  <div id=gallery class=gallery></div>
  <div id=grid hidden></div>
</main>
{run_files}
{job}
<dialog id=detail><form method=dialog><button class=close aria-label=Close>&times;</button></form>
  <a id=detail-link target=_blank><img id=detail-image alt=""></a><table id=detail-params></table></dialog>
<script type="application/json" id=sdbatch-data>{data}</script>
<script>{script}</script>
</body>
</html>
"""

STYLE = """
[hidden] { display: none !important; }
:root { color-scheme: light dark; --line: #8884; --accent: #3b82f6; font-family: system-ui, sans-serif; }
body { margin: 0 auto; max-width: 1400px; padding: 1rem 1.5rem; }
h1 { font-size: 1.4rem; margin: 0 0 .5rem; overflow-wrap: anywhere; }
.summary { display: flex; flex-wrap: wrap; gap: .5rem; margin: 0; }
.summary div { border: 1px solid var(--line); border-radius: 6px; padding: .3rem .7rem; }
.summary dt { font-size: .75rem; opacity: .7; } .summary dd { margin: 0; font-weight: 600; }
.note, .failures { margin: .5rem 0; } .failures li { overflow-wrap: anywhere; }
.toolbar { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; margin: 1rem 0 .5rem; }
button { font: inherit; cursor: pointer; border: 1px solid var(--line); border-radius: 999px;
  padding: .15rem .7rem; background: transparent; color: inherit; }
button[aria-selected=true], button[aria-pressed=true] { background: var(--accent); color: white; border-color: var(--accent); }
.filters fieldset { border: 0; border-top: 1px solid var(--line); margin: 0; padding: .4rem 0;
  display: flex; flex-wrap: wrap; gap: .3rem; align-items: center; }
.filters legend { float: left; font-weight: 600; margin-right: .5rem; }
.filters button { max-width: 24rem; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: .75rem; }
figure { margin: 0; } figure img, .cell img { width: 100%; height: auto; border-radius: 4px; cursor: zoom-in; display: block; }
img.small { image-rendering: pixelated; }
figcaption { font-size: .75rem; opacity: .8; overflow-wrap: anywhere; max-height: 3.2em; overflow: hidden; }
#grid table { border-collapse: collapse; } #grid th { font-weight: 600; font-size: .8rem; padding: .3rem;
  max-width: 14rem; overflow-wrap: anywhere; } #grid td { vertical-align: top; padding: .2rem; }
.cell { display: flex; gap: .2rem; } .cell img { width: 128px; }
.run-files { margin-top: 2rem; } .run-files figure { display: inline-block; margin: 0 1rem 1rem 0; max-width: 100%; }
.video-row { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.run-files img, .run-files video { max-width: min(100%, 900px); width: auto; cursor: pointer; }
dialog { max-width: min(92vw, 1000px); border: 1px solid var(--line); border-radius: 8px; }
dialog img { max-width: min(85vw, 640px); min-width: 256px; image-rendering: pixelated; display: block; margin: auto; }
dialog .close { float: right; } dialog table { margin-top: .75rem; border-collapse: collapse; font-size: .85rem; }
dialog th { text-align: left; padding: .15rem .75rem .15rem 0; vertical-align: top; white-space: nowrap; }
dialog td { overflow-wrap: anywhere; }
"""

SCRIPT = r"""
"use strict";
const data = JSON.parse(document.getElementById("sdbatch-data").textContent);
const $ = (id) => document.getElementById(id);
const active = new Map(data.axes.map((axis) => [axis.name, new Set(axis.values.map((v) => v.key))]));
const labels = new Map(data.axes.map((axis) => [axis.name, new Map(axis.values.map((v) => [v.key, v.label]))]));

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function visible(item) {
  return data.axes.every((axis) => !(axis.name in item.axes) || active.get(axis.name).has(item.axes[axis.name]));
}

function thumbnail(item) {
  if (!item.thumb) return el("div", {className: "missing", textContent: "no image"});
  const img = el("img", {src: item.thumb, alt: item.params[0][1], title: item.title, tabIndex: 0});
  if (item.small) img.classList.add("small");
  img.addEventListener("click", () => showDetail(item));
  img.addEventListener("keydown", (event) => { if (event.key === "Enter") showDetail(item); });
  return img;
}

const cards = data.items.map((item) => {
  const caption = Object.keys(item.axes).map((name) => name + ": " + labels.get(name).get(item.axes[name]));
  return el("figure", {className: "card"}, [thumbnail(item), el("figcaption", {textContent: caption.join(" · ")})]);
});
$("gallery").append(...cards);

function showDetail(item) {
  const image = $("detail-image");
  image.src = item.thumb || "";
  image.alt = item.params[0][1];
  const anchor = $("detail-link");
  if (item.href) anchor.href = item.href; else anchor.removeAttribute("href");
  $("detail-params").replaceChildren(...item.params.map(([label, value]) =>
    el("tr", {}, [el("th", {textContent: label}), el("td", {textContent: value})])));
  $("detail").showModal();
}

function renderFilters() {
  $("filters").replaceChildren(...data.axes.filter((axis) => axis.values.length > 1).map((axis) => {
    const chosen = active.get(axis.name);
    const buttons = axis.values.map((value) => {
      const button = el("button", {type: "button", textContent: value.label, title: value.label});
      button.dataset.axis = axis.name;
      button.setAttribute("aria-pressed", String(chosen.has(value.key)));
      button.addEventListener("click", () => {
        chosen.has(value.key) ? chosen.delete(value.key) : chosen.add(value.key);
        update();
      });
      return button;
    });
    const all = el("button", {type: "button", textContent: "all", title: "show every value"});
    all.addEventListener("click", () => { axis.values.forEach((v) => chosen.add(v.key)); update(); });
    return el("fieldset", {}, [el("legend", {textContent: axis.name}), ...buttons, all]);
  }));
}

function fillSelects() {
  const names = data.axes.map((axis) => axis.name);
  for (const [id, extra] of [["grid-x", []], ["grid-y", ["(none)"]]]) {
    $(id).replaceChildren(...[...names, ...extra].map((name) => el("option", {value: name, textContent: name})));
  }
  $("grid-x").value = names[0] || "";
  $("grid-y").value = names[1] || "(none)";
}

function renderGrid() {
  const xName = $("grid-x").value, yName = $("grid-y").value;
  const axis = (name) => data.axes.find((a) => a.name === name);
  const xs = axis(xName) ? axis(xName).values : [{key: undefined, label: ""}];
  const ys = axis(yName) ? axis(yName).values : [{key: undefined, label: ""}];
  const shown = data.items.filter(visible);
  const header = el("tr", {}, [el("th"), ...xs.map((x) => el("th", {textContent: xName + ": " + x.label}))]);
  const rows = ys.map((y) => el("tr", {}, [
    el("th", {textContent: axis(yName) ? yName + ": " + y.label : ""}),
    ...xs.map((x) => el("td", {}, [el("div", {className: "cell"}, shown
      .filter((item) => (x.key === undefined || item.axes[xName] === x.key) &&
                        (y.key === undefined || item.axes[yName] === y.key))
      .map(thumbnail))])),
  ]));
  $("grid").replaceChildren(data.axes.length ? el("table", {}, [header, ...rows])
                                             : el("p", {textContent: "This run has no sweep axes."}));
}

function update() {
  let count = 0;
  data.items.forEach((item, i) => { const show = visible(item); cards[i].hidden = !show; count += show; });
  $("count").textContent = "Showing " + count + " of " + data.items.length;
  renderFilters();
  const grid = $("show-grid").getAttribute("aria-selected") === "true";
  $("gallery").hidden = grid;
  $("grid").hidden = !grid;
  document.querySelectorAll(".toolbar label").forEach((label) => { label.hidden = !grid; });
  if (grid) renderGrid();
}

function selectView(grid) {
  $("show-grid").setAttribute("aria-selected", String(grid));
  $("show-gallery").setAttribute("aria-selected", String(!grid));
  history.replaceState(null, "", grid ? "#view=grid" : location.pathname);  // a link that reopens this view
  update();
}

$("show-gallery").addEventListener("click", () => selectView(false));
$("show-grid").addEventListener("click", () => selectView(true));
$("grid-x").addEventListener("change", update);
$("grid-y").addEventListener("change", update);
fillSelects();
selectView(location.hash === "#view=grid");
"""
