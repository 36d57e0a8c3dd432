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
    """A source as direction finders see it (render time)."""

    def __init__(self, model, item, spec: dict, initial_latents):
        self.model, self.item, self.spec = model, item, spec
        self.prompt, self.negative_prompt, self.seed = spec["prompt"], spec["negative_prompt"], spec["seed"]
        self.guidance, self.steps = item.guidance, item.steps
        self.initial_latents = initial_latents  # x_T: seeded noise or an inverted image

    def embeddings(self, text: str):
        """Text-encoder hidden states (tokens, features) of ``text``, as the renderer uses them."""
        from sdbatch_plugins.text import clip_skip_of, encode_prompt

        return encode_prompt(self.model, text, clip_skip_of(self.item))

    def latents_at(self, fraction: float):
        """(x_t, step index, timestep) after DDIM sampling from x_T down to ``fraction`` of the schedule."""
        import torch
        from diffusers import DDIMScheduler

        model = self.model
        scheduler = DDIMScheduler.from_config(model.scheduler_config)
        scheduler.set_timesteps(self.steps, device=model.device)
        stop = edit_step(scheduler.timesteps, fraction)
        sample = self.initial_latents[None].to(model.device, model.dtype) * scheduler.init_noise_sigma
        embeds = torch.stack([self.embeddings(self.negative_prompt), self.embeddings(self.prompt)])
        with torch.inference_mode():
            for t in scheduler.timesteps[:stop]:
                uncond, text = model.unet(torch.cat([sample, sample]), t, encoder_hidden_states=embeds,
                                          return_dict=False)[0].chunk(2)
                noise = uncond + self.guidance * (text - uncond) if self.guidance > 1 else text
                sample = scheduler.step(noise, t, sample, return_dict=False)[0]
        return sample[0].float().cpu(), stop, int(scheduler.timesteps[stop])


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
