"""Semantic editing: the edit conditioner, labelled strips per direction, saved directions.

The edit conditioner finds each item's direction (once per source and direction entry,
cached per worker) and applies it with the item's strength in the direction's space.
Strength 0 applies nothing, so it reproduces the unedited image bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sdbatch import hookimpl
from sdbatch.api import Conditioner, Extension, Writer

from .animation import start_latents
from .xyz_grid import GridOptions, XYZGrid


class EditConditioner(Conditioner):
    """Moves an item along its direction: text embeddings, x_t at a timestep, or SEGA guidance."""

    name = "edit"
    description = "applies edit directions with each item's strength"

    def condition(self, items, options, model, state):
        from sdbatch.editing import EditSource, edit_step

        extension = EditExtension(state)
        for row, item in enumerate(items):
            edit = item.extra.get("edit")
            if edit is None:
                continue
            source_latents = start_latents(model, item, edit["source"])
            if edit["source"].get("image"):
                state.latents[row] = source_latents
            source = EditSource(state, row, edit["source"], source_latents)
            direction = self.direction(state.registry, model, item, edit, source)
            state.outputs[row]["direction"] = direction
            strength = edit["strength"]
            if strength == 0:
                continue
            if direction.space == "text":
                hidden = state.prompt["encoder_hidden_states"]
                hidden[row] = hidden[row] + strength * direction.tensor.to(hidden.device, hidden.dtype)
            elif direction.space == "latent":
                step = edit_step(state.timesteps, direction.meta["timestep"])
                extension.latent_edits[row] = (step, strength * direction.tensor)
            elif direction.space == "guidance":
                # the editing prompt's whole conditioning (SDXL and SD3 pool it too); its states are the direction's
                prompt = direction.meta.get("prompt")
                cond = dict(source.conditioning(prompt)) if prompt is not None else {}
                cond["encoder_hidden_states"] = direction.tensor
                extension.sega_rows.append((row, strength, direction, cond))
            else:
                raise ValueError(f"direction {direction.name!r} has unknown space {direction.space!r}")
        return extension if extension.latent_edits or extension.sega_rows else None

    def a1111_fields(self, item, options) -> list:
        """The edit's direction (kind: label) and strength; A1111 has no such fields, so they go last."""
        edit = item.extra.get("edit")
        if not edit:
            return []
        label = str(item.axes.get("direction", "")).split(": ", 1)[-1]
        return [("Edit direction", f"{edit['direction']['kind']}: {label}"),
                ("Edit strength", f"{edit['strength']:g}")]

    def direction(self, registry, model, item, edit: dict, source):
        """The item's direction, found once per (source, direction entry, steps, size) per model."""
        spec = edit["direction"]
        key = json.dumps([model.cache_key, edit["source"], spec["kind"], spec["options"], item.sampler, item.steps,
                          item.width, item.height, item.guidance], sort_keys=True)
        cache = model.extra.setdefault("edit_directions", {})
        if key not in cache:
            finder = registry.require("direction", spec["kind"]).obj
            cache[key] = finder.find(model, source, finder.parse_options(spec["options"]))
        return cache[key][spec["index"]]


class EditExtension(Extension):
    """Latent edits (x_t moved at a step) and semantic guidance (SEGA) inside the denoising loop."""

    def __init__(self, state):
        self.state = state
        self.latent_edits: dict = {}  # row -> (step index, delta)
        self.sega_rows: list = []  # (row, strength, direction, the editing prompt's conditioning)

    def before_step(self, step, t, latents):
        for row, (at_step, delta) in self.latent_edits.items():
            if at_step == step:  # the edit moves this row's x_t, then sampling goes on from there
                latents[row] = latents[row] + delta.to(latents.device, latents.dtype)
        return latents

    def guide(self, step, t, x, uncond, text):
        """Semantic guidance: strength x (eps(edit) - eps(uncond)), masked to its top quantile, after warm-up."""
        import torch

        if not self.sega_rows:
            return None
        state, model = self.state, self.state.model
        first = state.items[0]
        addition = torch.zeros_like(uncond)
        for row, strength, direction, edit_cond in self.sega_rows:
            if step < direction.meta["warmup"] * state.items[row].steps:
                continue
            cond = {name: value[row:row + 1] for name, value in state.prompt.items()}
            cond.update({name: value.to(x.device, x.dtype)[None] for name, value in edit_cond.items()})
            guidance = torch.ones(1)
            edit = model.family.denoise(model, x[row:row + 1], t, cond, guidance, first.width, first.height)[0]
            guide = edit - uncond[row]
            cutoff = torch.quantile(guide.abs().flatten().float(), direction.meta["threshold"])
            addition[row] = strength * torch.where(guide.abs() >= cutoff, guide, torch.zeros_like(guide))
        return addition


@dataclass
class StripOptions(GridOptions):
    x: str = "strength"
    z: str | None = "direction"
    path: str = field(default="strips/{job}-{name}.png", metadata={"help": "fields: {job}, {name}"})
    scale: int = field(default=2, metadata={"min": 1, "max": 16})


class Strip(XYZGrid):
    """A labelled strip of strengths for each (source, direction) of an edit job."""

    name = "strip"
    description = "one labelled strength strip per source and direction"
    Options = StripOptions


@dataclass
class DirectionsOptions:
    path: str = field(default="directions/{name}.safetensors", metadata={"help": "fields: {name}"})


class DirectionsWriter(Writer):
    """Saves every direction an edit found (safetensors + metadata) for reuse with kind: file."""

    name = "directions"
    description = "edit directions as safetensors, reusable on other sources"
    Options = DirectionsOptions

    def write(self, result) -> list:
        from sdbatch.editing import save_direction
        from sdbatch.plan import slug

        direction = result.outputs.get("direction")
        edit = result.item.extra.get("edit")
        if direction is None or edit is None or direction.tensor is None:
            return []
        name = f"{slug(result.item.axes.get('source', 'source'), 40)}--{slug(direction.name, 60)}"
        relpath = self.options.path.format(name=name)
        if relpath in self.context.out.run_files:
            return []
        self.context.out.write_run_file_via(relpath, lambda temp: save_direction(direction, temp), self.name)
        return []


@hookimpl(trylast=True)
def register_conditioners(register):
    """The edit conditioner (added to edit jobs automatically)."""
    register(EditConditioner())


@hookimpl(trylast=True)
def register_writers(register):
    """Edit strips and saved directions."""
    register(Strip)
    register(DirectionsWriter)
