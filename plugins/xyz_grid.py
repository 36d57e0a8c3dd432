"""An X/Y(/Z) plot like AUTOMATIC1111's: one labelled grid image per Z value and other-axis combination."""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass, field

from sdbatch import hookimpl
from sdbatch.api import Writer
from sdbatch.output import check_template


@dataclass
class GridOptions:
    x: str = field(metadata={"help": "the sweep axis across the columns"})
    y: str | None = field(default=None, metadata={"help": "the sweep axis down the rows"})
    z: str | None = field(default=None, metadata={"help": "one grid per value of this axis"})
    path: str = field(default="grids/{job}-{name}.png", metadata={"help": "fields: {job}, {name} (the fixed axis values)"})
    font_size: int = field(default=14, metadata={"min": 6, "max": 128})
    scale: int = field(default=1, metadata={"min": 1, "max": 16, "help": "enlarge small cells (nearest neighbour)"})
    margin: int = field(default=0, metadata={"min": 0, "max": 256})


class XYZGrid(Writer):
    """Writes grids at the end of the run from the images an image writer stored."""

    name = "xyz_grid"
    description = "A1111-style X/Y/Z plot with axis labels"
    Options = GridOptions

    @classmethod
    def check(cls, options, job) -> list[str]:
        problems = check_template(options.path, fields={"job", "name"})
        axis_names = [name for axis in job.plan.axes for name in axis.names]
        used = {}
        for role in ("x", "y", "z"):
            name = getattr(options, role)
            if name is None:
                continue
            if name not in axis_names:
                shown = ", ".join(axis_names) or "none (add a sweep)"
                problems.append(f"{role}: '{name}' is not a sweep axis of this job; axes: {shown}")
                continue
            axis = _axis_of(job.plan, name)
            if id(axis) in used:
                problems.append(f"{role}: '{name}' is zipped with {used[id(axis)]}'s axis; a grid needs independent axes")
            used[id(axis)] = role
        if not any(writer_class.writes_images for writer_class, _options, _use in job.writers):
            problems.append("needs an image writer (png, jpeg or webp) in outputs to read cells from")
        return problems

    def finish(self, entries) -> list:
        """Compose the grids from the finished items' image files."""
        from PIL import Image

        opts, plan = self.options, self.context.job.plan
        names = [n for n in (opts.x, opts.y, opts.z) if n]
        chosen = [_axis_of(plan, n) for n in names]
        positions = {n: _positions(axis) for n, axis in zip(names, chosen)}
        values = {n: [p[n] for p in positions[n]] for n in names}
        files = {}
        for entry in entries:
            path = entry.image_path()
            if path is not None:
                files[_key(entry.item.get("axes", {}))] = self.context.out.root / path
        others = [axis for axis in plan.axes if axis not in chosen]
        rows = positions[opts.y] if opts.y else [{}]
        written: list[str] = []
        for rest in itertools.product(*[_positions(axis) for axis in others]):
            fixed = {k: v for part in rest for k, v in part.items()}
            for z in positions[opts.z] if opts.z else [{}]:
                cells = [[files.get(_key({**fixed, **z, **y, **x})) for x in positions[opts.x]] for y in rows]
                if not any(cell is not None for row in cells for cell in row):
                    continue
                grid = self._compose(cells, values, {**fixed, **z}, Image)
                shown = [v for part in rest for v in part.values()] + list(z.values())
                relpath = self._unique_path(written, "-".join(_short(v) for v in shown) or "all")
                buffer = io.BytesIO()
                grid.save(buffer, "PNG")
                written.append(self.context.out.write_run_file(relpath, buffer.getvalue(), self.name).path)
        return written

    def _unique_path(self, written: list[str], name: str) -> str:
        """The grid's path; a name that slugs like an earlier grid's gets a number, never its file."""
        relpath = self.options.path.format(job=self.context.job_name, name=name)
        count = 2
        while relpath in written:
            relpath = self.options.path.format(job=self.context.job_name, name=f"{name}-{count}")
            count += 1
        return relpath

    def _compose(self, cells, values, fixed: dict, Image):
        from PIL import ImageDraw, ImageFont

        opts = self.options
        first = next(cell for row in cells for cell in row if cell is not None)
        with Image.open(first) as probe:
            cell_w, cell_h = probe.size[0] * opts.scale, probe.size[1] * opts.scale
        font = ImageFont.load_default(size=opts.font_size)
        columns = len(cells[0])
        grid_w = columns * cell_w + (columns - 1) * opts.margin
        text = grid_text(opts, values, fixed, font.getlength, cell_w, max(grid_w, TITLE_WIDTH))
        line_h = opts.font_size + 4
        title_h = line_h * len(text.title) + 8 if text.title else 0
        top = title_h + line_h * max(len(lines) for lines in text.columns) + 8
        left = (max(int(font.getlength(t)) for t in text.rows) + 16) if text.rows else 0
        width = max(left + grid_w, max((int(font.getlength(t)) + 8 for t in text.title), default=0))
        height = top + len(cells) * cell_h + (len(cells) - 1) * opts.margin
        grid = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(grid)
        for n, line in enumerate(text.title):
            draw.text((4, 4 + n * line_h), line, fill="black", font=font)
        for col, lines in enumerate(text.columns):
            x0 = left + col * (cell_w + opts.margin)
            for n, line in enumerate(lines):
                draw.text((x0 + cell_w / 2, title_h + 4 + n * line_h), line, fill="black", font=font, anchor="mt")
        for row, cells_row in enumerate(cells):
            y0 = top + row * (cell_h + opts.margin)
            if text.rows:
                draw.text((left - 8, y0 + cell_h / 2), text.rows[row], fill="black", font=font, anchor="rm")
            for col, cell in enumerate(cells_row):
                if cell is not None:
                    with Image.open(cell) as image:
                        cell_image = image.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST)
                        grid.paste(cell_image, (left + col * (cell_w + opts.margin), y0))
        return grid


#: Titles wrap at this width at least (pixels), so a narrow strip's title stays readable.
TITLE_WIDTH = 360


@dataclass
class GridText:
    """Everything a grid shows in words: title lines, each column's label lines, each row's label."""

    title: list
    columns: list
    rows: list


def grid_text(opts, values: dict, fixed: dict, measure, cell_w: int, title_w: int) -> GridText:
    """The grid's words. The title names what holds for the whole grid: the values of the axes not
    shown (a strip's direction), the text every label of an axis shares (dropped from the labels),
    and an axis name too wide for its column labels. Lines break between words, never inside one."""
    title = [f"{name}: {value}" for name, value in fixed.items()]
    columns = axis_labels(opts.x, values[opts.x])
    if any(measure(word) > cell_w for label in columns for word in label.split()) and opts.x not in PROMPT_AXES:
        columns = [str(v) for v in values[opts.x]]  # "colorgrade.saturation: 1" does not fit: name it once
        title.append(f"columns: {opts.x}")
    rows = axis_labels(opts.y, values[opts.y]) if opts.y else []
    for name in (opts.x, opts.y):
        shared = shared_text(name, values[name]) if name else None
        if shared:
            title.append(f"{name}: {shared}")
    return GridText([line for text in title for line in wrap_words(text, measure, title_w)],
                    [wrap_words(label, measure, cell_w) for label in columns], rows)


PROMPT_AXES = ("prompt", "negative_prompt")

def _axis_of(plan, name: str):
    return next(axis for axis in plan.axes if name in axis.names)


def _positions(axis) -> list[dict]:
    """Each position of an axis as {name: value} for all its (zipped) names, as items record them."""
    result = []
    for index in range(len(axis)):
        values = axis.at(index)
        if "prompt" in values:
            values["prompt"] = values["prompt"][1]  # (template, prompt) pairs: items record the prompt
        result.append(values)
    return result


def _key(axes: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in axes.items()))


def axis_labels(name: str, values: list) -> list[str]:
    """Column or row labels; prompts show only the words that differ between them."""
    if name not in PROMPT_AXES:
        return [f"{name}: {v}" for v in values]
    words = [str(v).split() for v in values]
    head, tail = _shared_ends(words)
    if head is None:
        return [str(v) for v in values]
    return [" ".join(w[head: len(w) - tail]) or str(v) for w, v in zip(words, values)]


def shared_text(name: str, values: list) -> str | None:
    """What every prompt label leaves out, with "…" where the labels' words go; None if nothing."""
    if name not in PROMPT_AXES:
        return None
    words = [str(v).split() for v in values]
    head, tail = _shared_ends(words)
    if not head and not tail:
        return None
    first = words[0]
    return " ".join([*first[:head], "…", *first[len(first) - tail:]])


def _shared_ends(words: list) -> tuple:
    """How many leading and trailing words every value shares (None, None for fewer than two)."""
    if len(words) < 2:
        return None, None
    shortest = min(len(w) for w in words)
    head = next((i for i in range(shortest) if len({tuple(w[: i + 1]) for w in words}) > 1), shortest)
    tail = next((i for i in range(shortest - head) if len({tuple(w[len(w) - i - 1:]) for w in words}) > 1),
                shortest - head)
    return head, tail


def wrap_words(text: str, measure, width: float) -> list[str]:
    """Lines no wider than ``width`` (as ``measure`` says), broken only between words: a word
    wider than the line stands alone on its line rather than being cut."""
    lines: list[str] = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _short(value, limit: int = 24) -> str:
    """A grid file name's part for a value: its slug, cut between words."""
    from sdbatch.plan import slug

    text = slug(str(value), 1000)
    if len(text) <= limit:
        return text
    head = text[: limit + 1]
    return head.rsplit("-", 1)[0] if "-" in head else text[:limit]


@hookimpl(trylast=True)
def register_writers(register):
    """The X/Y/Z grid writer."""
    register(XYZGrid)
