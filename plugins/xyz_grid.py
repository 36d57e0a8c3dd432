"""An X/Y(/Z) plot like AUTOMATIC1111's: one labelled grid image per Z value and other-axis combination."""

from __future__ import annotations

import io
import itertools
import textwrap
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
                grid = self._compose(cells, values, Image)
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

    def _compose(self, cells, values, Image):
        from PIL import ImageDraw, ImageFont

        opts = self.options
        first = next(cell for row in cells for cell in row if cell is not None)
        with Image.open(first) as probe:
            cell_w, cell_h = probe.size[0] * opts.scale, probe.size[1] * opts.scale
        font = ImageFont.load_default(size=opts.font_size)
        x_labels = axis_labels(opts.x, values[opts.x])
        y_labels = axis_labels(opts.y, values[opts.y]) if opts.y else []
        wrap = max(8, cell_w // max(1, opts.font_size // 2))
        line_h = opts.font_size + 4
        top = line_h * max(len(_wrap(t, wrap)) for t in x_labels) + 8
        left = (max(int(font.getlength(t)) for t in y_labels) + 16) if y_labels else 0
        width = left + len(x_labels) * cell_w + (len(x_labels) - 1) * opts.margin
        height = top + len(cells) * cell_h + (len(cells) - 1) * opts.margin
        grid = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(grid)
        for col, text in enumerate(x_labels):
            x0 = left + col * (cell_w + opts.margin)
            for n, line in enumerate(_wrap(text, wrap)):
                draw.text((x0 + cell_w / 2, 4 + n * line_h), line, fill="black", font=font, anchor="mt")
        for row, cells_row in enumerate(cells):
            y0 = top + row * (cell_h + opts.margin)
            if y_labels:
                draw.text((left - 8, y0 + cell_h / 2), y_labels[row], fill="black", font=font, anchor="rm")
            for col, cell in enumerate(cells_row):
                if cell is not None:
                    with Image.open(cell) as image:
                        cell_image = image.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST)
                        grid.paste(cell_image, (left + col * (cell_w + opts.margin), y0))
        return grid


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
    if name not in ("prompt", "negative_prompt"):
        return [f"{name}: {v}" for v in values]
    words = [str(v).split() for v in values]
    if len(words) < 2:
        return [str(v) for v in values]
    shortest = min(len(w) for w in words)
    head = next((i for i in range(shortest) if len({tuple(w[: i + 1]) for w in words}) > 1), shortest)
    tail = next((i for i in range(shortest - head) if len({tuple(w[len(w) - i - 1:]) for w in words}) > 1),
                shortest - head)
    return [" ".join(w[head: len(w) - tail]) or str(v) for w, v in zip(words, values)]


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width) or [""]  # long words break: a label never spills into the next


def _short(value) -> str:
    from sdbatch.plan import slug

    return slug(str(value), 24)


@hookimpl(trylast=True)
def register_writers(register):
    """The X/Y/Z grid writer."""
    register(XYZGrid)
