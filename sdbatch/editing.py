"""Semantic editing as plans: sources x directions x strengths, each an ordinary item.

Planning (this module's top half) imports no torch. At render time ``EditSource`` gives
direction finders what they need from a source: prompt embeddings and the source's
x_t part-way through its DDIM trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EditPlan:
    """The edit axes of a job: labelled sources and directions, and the strengths."""

    sources: dict = field(default_factory=dict)  # label -> {prompt, negative_prompt, seed, image, image_sha256}
    directions: dict = field(default_factory=dict)  # label -> {kind, options, index}
    strengths: list = field(default_factory=list)

    def fields(self, source: str, direction: str, strength: float) -> dict:
        """Item fields and ``extra["edit"]`` for one (source, direction, strength)."""
        spec = self.sources[source]
        fields = {"prompt": spec["prompt"], "negative_prompt": spec["negative_prompt"], "seed": spec["seed"]}
        edit = {"source": spec, "direction": self.directions[direction], "strength": float(strength)}
        return {"fields": fields, "edit": edit}


def strength_values(spec) -> list[float]:
    """A list as given, or ``{from, to, steps}`` as evenly spaced values (0 kept exact)."""
    if isinstance(spec, list):
        return [float(v) for v in spec]
    start, stop, steps = float(spec["from"]), float(spec["to"]), int(spec["steps"])
    if steps == 1:
        return [start]
    values = [start + (stop - start) * i / (steps - 1) for i in range(steps)]
    return [0.0 if abs(v) < 1e-12 else round(v, 10) for v in values]


def edit_step(timesteps, fraction: float) -> int:
    """The sampling step whose timestep is the first at or below ``fraction`` of the schedule."""
    limit = fraction * 1000
    for index, t in enumerate(timesteps):
        if float(t) <= limit:
            return index
    return len(timesteps) - 1


class EditSource:
    """A source as direction finders see it (render time): its conditioning and its own trajectory.

    ``latents_at`` runs the renderer's loop (the item's sampler, ControlNets and all) on the
    unedited source, so a latent edit lands on exactly the trajectory the image follows.
    """

    def __init__(self, state, row: int, spec: dict, initial_latents):
        self.model, self.item, self.spec = state.model, state.items[row], spec
        self.renderer, self.timesteps = state.renderer, state.timesteps
        self.prompt, self.negative_prompt, self.seed = spec["prompt"], spec["negative_prompt"], spec["seed"]
        self.guidance, self.steps = self.item.guidance, self.item.steps
        self.initial_latents = initial_latents  # x_T: seeded noise or an inverted image

    def conditioning(self, text: str) -> dict:
        """The family's conditioning of ``text`` (name -> tensor), as the renderer uses it."""
        clip_skip = next((use.options.get("clip_skip", 1) for use in self.item.conditioners if use.name == "text"), 1)
        return self.model.encode_prompt(text, clip_skip=clip_skip)

    def embeddings(self, text: str):
        """Text-encoder hidden states (tokens, features) of ``text``, as the renderer uses them."""
        return self.conditioning(text)["encoder_hidden_states"]

    def latents_at(self, fraction: float):
        """(x_t, step index, timestep) of the source's own trajectory at ``fraction`` of the schedule."""
        from dataclasses import replace

        stop = edit_step(self.timesteps, fraction)
        source = replace(self.item, conditioners=tuple(c for c in self.item.conditioners if c.name != "edit"),
                         extra={k: v for k, v in self.item.extra.items() if k != "edit"})
        x_t = self.renderer.latents_at([source], stop, given=[self.initial_latents])
        return x_t[0].float().cpu(), stop, int(self.timesteps[stop])


def save_direction(direction, path) -> None:
    """A direction as safetensors: the tensor plus its name, space and metadata (JSON) as metadata."""
    import json

    from safetensors.torch import save_file

    metadata = {"name": direction.name, "space": direction.space, "meta": json.dumps(direction.meta)}
    save_file({"direction": direction.tensor.contiguous().float().cpu()}, str(path), metadata=metadata)


def load_direction(path):
    """A direction saved by ``save_direction`` (safetensors only: no pickle)."""
    import json

    from safetensors import safe_open

    from .api import Direction

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensor = handle.get_tensor("direction")
    if "space" not in metadata:
        raise ValueError(f"{path} is not an sdbatch direction (no 'space' in its metadata)")
    return Direction(metadata.get("name", "direction"), metadata["space"], tensor, json.loads(metadata.get("meta", "{}")))
