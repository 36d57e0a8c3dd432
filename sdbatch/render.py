"""The renderer: a batch of items in, one PIL image per item out, in numbered steps.

It knows no model and no feature. The item's model family encodes prompts, calls the
denoiser and lays out latents; conditioners fill the ``RenderState`` and may return
``Extension`` objects whose methods the loop calls (ControlNet, img2img, edits ...).

Determinism contract: an item's pixels depend on the item and the model only. Every
item draws its initial noise and every later noise (ancestral and SDE samplers) from
its own CPU generator; classifier-free guidance is applied per item; nothing is shared
across a batch. See README.md ("Reproducibility") for what holds on GPU.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from .api import BatchSplit, Extension, Item, RenderState, noised
from .latents import initial_noise, item_generator
from .models import Model, ModelCache, resolve_device
from .plugins import plugin_errors
from .rows import fixed_chunks, make_rows_independent, pad_rows, row_independent_kernels


@dataclass
class Rendered:
    """One item's result before writing."""

    item: Item
    image: Any  # PIL.Image
    model_hash: str
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)  # extra results conditioners attached (e.g. directions)


class Renderer:
    """Renders batches of items that share a batch key; models are loaded once and cached."""

    def __init__(self, registry, device: str = "auto", dtype: str = "auto", models: dict | None = None,
                 pad_batches_to: int | None = None, batch_invariant: bool = True):
        self.registry = registry
        self.device = resolve_device(device)
        self.dtype = dtype
        self.model_infos = models or {}
        self.cache = ModelCache(registry)
        # On GPU, kernels are chosen by shape: a fixed batch shape keeps pixels stable.
        self.pad_batches_to = pad_batches_to
        self.batch_invariant = batch_invariant  # CPU: row-independent kernels (sdbatch.rows), the default

    def model_for(self, item: Item) -> Model:
        model = self.cache.get(self.model_infos[item.model], self.device, self.dtype)
        if self.batch_invariant and str(model.device) == "cpu" and not model.extra.get("batch_invariant"):
            # the VAEs too, for the direct kernels' speed (they decode row by row)
            for part in (model.denoiser, model.components.get("vae"), model.components.get("decoder")):
                if part is not None:
                    make_rows_independent(part)
            model.extra["batch_invariant"] = True
        if not model.extra.get("speed_applied"):
            apply_speed_options(model)
            model.extra["speed_applied"] = True
        return model

    def render(self, items: list[Item]) -> list[Rendered]:
        with self._no_grad():
            return self._render(items)

    def _render(self, items: list[Item]) -> list[Rendered]:
        try:
            state, extensions = self.prepare(items)
        except BatchSplit as split:  # e.g. prompts of other chunk counts: each group renders on its own
            results: dict = {}
            for group in split.groups:
                rows = [row for row in group if row < len(items)]  # padding rows are not rendered twice
                for row, result in zip(rows, self.render([items[row] for row in rows]) if rows else []):
                    results[row] = result
            return [results[row] for row in range(len(items))]
        latents = self.denoise(state, extensions)
        return self.finish(items, state, extensions, latents)

    def prepare(self, items: list[Item], stop_at: int | None = None, given=None,
                strength: float | None = None) -> tuple[RenderState, list]:
        """Steps 1-4: check, scheduler and timesteps, conditioning, initial latents.

        ``stop_at`` keeps only the first steps; ``given`` is an x_T per row (None: the seed's noise);
        ``strength`` runs the last fraction of the schedule (else the conditioners' ``strength``)."""
        # 1. check inputs: one batch key, padded to the fixed batch shape
        keys = {item.batch_key() for item in items}
        if len(keys) != 1:
            raise ValueError(f"a batch must share one batch key, got {len(keys)}")
        padded = self._pad(items)
        model = self.model_for(items[0])
        rows = len(padded)
        state = RenderState(items=padded, model=model, registry=self.registry, renderer=self,
                            latents=[None] * rows, outputs=[{} for _ in padded])
        uses = self._uses(padded)
        # 2. scheduler and timesteps (a fresh scheduler: they keep per-run state)
        state.strength = strength if strength is not None else self._strength(uses)
        state.scheduler, state.timesteps = self._timesteps(model, padded[0], state.strength)
        if stop_at is not None:
            state.timesteps = state.timesteps[:stop_at]
        # 3. conditioning: each conditioner in job order; some return loop extensions
        extensions = self._condition(uses, state)
        for row, latents in enumerate(given or ()):
            if latents is not None:
                state.latents[row] = latents
        state.cfg = model.family.uses_cfg(model) and any(item.guidance > 1.0 for item in padded)
        # 4. initial latents: each item's own noise (or a given x_T), scaled for this scheduler
        state.generators = [item_generator(item.seed) for item in padded]
        state.noise = self._noise(padded, model, state)
        # flow-matching schedulers start from the noise itself (they have no init_noise_sigma)
        state.x = state.noise * getattr(state.scheduler, "init_noise_sigma", 1.0)
        for extension in extensions:
            extension.start(state)
        return state, extensions

    def denoise(self, state: RenderState, extensions: list):
        """Step 5: the denoising loop, with per-item classifier-free guidance."""
        model, family, scheduler = state.model, state.model.family, state.scheduler
        first = state.items[0]
        latents = state.x
        guidance = torch.tensor([item.guidance for item in state.items], device=model.device, dtype=torch.float32)
        cond = state.prompt
        if state.cfg:
            cond = {name: torch.cat([state.negative[name], value]) for name, value in state.prompt.items()}
        size = {"width": first.width, "height": first.height}
        step_kwargs = _step_kwargs(scheduler, state.generators)
        _seed_noise_sampler(scheduler, state.items)
        with row_independent_kernels(model.device, self.batch_invariant):
            for step, t in enumerate(state.timesteps):
                for extension in extensions:
                    latents = extension.before_step(step, t, latents)
                x = torch.cat([latents, latents]) if state.cfg else latents
                if hasattr(scheduler, "scale_model_input"):
                    x = scheduler.scale_model_input(x, t)
                x_in = x
                kwargs: dict = {}
                for extension in extensions:
                    x_in = extension.model_input(step, t, x_in)
                    add_kwargs(kwargs, extension.denoiser_kwargs(step, t, x, cond))
                prediction = family.denoise(model, x_in, t, cond, state.for_guidance(guidance), **size, **kwargs)
                if state.cfg:
                    prediction = self._guide(prediction, guidance, step, t, x, extensions)
                latents = scheduler.step(prediction, t, latents, **step_kwargs, return_dict=False)[0]
                for extension in extensions:
                    latents = extension.after_step(step, t, latents)
        return latents

    def finish(self, items: list[Item], state: RenderState, extensions: list, latents) -> list[Rendered]:
        """Steps 6-7: decode, then finishing (extensions, per row and per batch) and the items' post-processors."""
        model, first = state.model, items[0]
        images = self._decode(model, model.family.unpack(model, latents, first.width, first.height))
        pils = []
        for row, pil in enumerate(_to_pils(images[: len(items)])):
            for extension in extensions:
                pil = extension.finish(row, pil)
            pils.append(pil)
        for extension in extensions:
            pils = extension.finish_batch(pils, latents[: len(items)])
        return [Rendered(item, self._postprocess(item, pil), model.hash, outputs=state.outputs[row])
                for row, (item, pil) in enumerate(zip(items, pils))]

    def refine(self, items: list[Item], clean, strength: float) -> list[Rendered]:
        """Render ``items`` from clean latents (one row each, unpacked, at the items' size), noised with
        each item's own noise and denoised over the last ``strength`` of the schedule: image-to-image
        from tensors, as a hires fix's second pass runs. The items' conditioners must not set a strength."""
        with self._no_grad():
            return self._refine(items, clean, strength)

    def _refine(self, items: list[Item], clean, strength: float) -> list[Rendered]:
        state, extensions = self.prepare(items, strength=strength)
        model = state.model
        rows = pad_rows(clean.to(model.device, model.dtype), len(state.items))  # padding rows: the last item's
        state.x = noised(state.scheduler, model.family.pack(model, rows), state.noise, state.timesteps[0])
        return self.finish(items, state, extensions, self.denoise(state, extensions))

    def latents_at(self, items: list[Item], stop_at: int, given=None):
        """The batch's latents after ``stop_at`` steps of its own trajectory (edits and finders use it)."""
        with self._no_grad():
            state, extensions = self.prepare(items, stop_at=stop_at, given=given)
            return self.denoise(state, extensions)[: len(items)]

    def _no_grad(self):
        """Inference mode, or plain no-grad when a model is compiled (torch.compile cannot trace
        inference tensors)."""
        compiled = any(info.memory.get("compile", "off") != "off" for info in self.model_infos.values())
        return torch.no_grad() if compiled else torch.inference_mode()

    # -- steps --------------------------------------------------------------------------
    def _pad(self, items: list[Item]) -> list[Item]:
        size = self.pad_batches_to
        if not size or len(items) >= size:
            return list(items)
        return list(items) + [items[-1]] * (size - len(items))

    def _uses(self, items: list[Item]) -> list:
        """(registry entry, parsed options per row) for each conditioner the batch uses, in job order."""
        uses = []
        for position, use in enumerate(items[0].conditioners):
            entry = self.registry.require("conditioner", use.name)
            with plugin_errors(entry):
                options = [entry.obj.parse_options(item.conditioners[position].options) for item in items]
            uses.append((entry, options))
        return uses

    def _strength(self, uses: list) -> float | None:
        strengths = [entry.obj.strength(options[0]) for entry, options in uses]
        strengths = [s for s in strengths if s is not None]
        return min(strengths) if strengths else None

    def _timesteps(self, model: Model, item: Item, strength: float | None):
        scheduler = self.registry.require("sampler", item.sampler).obj.create(model.scheduler_config)
        model.family.set_timesteps(model, scheduler, item.steps, item.width, item.height)
        return scheduler, _denoised_timesteps(scheduler, item.steps, strength)

    def _condition(self, uses: list, state: RenderState) -> list[Extension]:
        extensions = []
        for entry, options in uses:
            with plugin_errors(entry):
                extension = entry.obj.condition(state.items, options, state.model, state)
            if extension is not None:
                extensions.append(extension)
        if not state.prompt:
            raise ValueError("no conditioner produced prompt conditioning (add 'text' to conditioners)")
        return extensions

    def _noise(self, items, model: Model, state: RenderState) -> torch.Tensor:
        shape = model.family.latent_shape(model, items[0].width, items[0].height)
        rows = [given if given is not None else initial_noise(item.seed, shape, generator)
                for item, given, generator in zip(items, state.latents, state.generators)]
        return model.family.pack(model, torch.stack(rows).to(model.device, model.dtype))

    def _guide(self, prediction, guidance, step, t, x, extensions):
        """Classifier-free guidance per row, then extension guidance terms (e.g. SEGA)."""
        uncond, text = prediction.chunk(2)
        scale = guidance.to(prediction.dtype).view(-1, *([1] * (text.dim() - 1)))
        # Items with guidance <= 1 take the conditional prediction, as they would alone.
        guided = torch.where(scale > 1.0, uncond + scale * (text - uncond), text)
        for extension in extensions:
            term = extension.guide(step, t, x[: len(text)], uncond, text)
            if term is not None:
                guided = guided + term
        return guided

    def _decode(self, model: Model, latents: torch.Tensor) -> torch.Tensor:
        vae = model.components.get("decoder") or model.vae  # speed.tiny_vae: an AutoencoderTiny decodes
        scaled = latents / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            scaled = scaled + vae.config.shift_factor
        chunk = decode_rows(model, scaled.shape)
        images = torch.cat([vae.decode(rows.to(vae.dtype), return_dict=False)[0]
                            for rows in fixed_chunks(scaled, chunk)])[: len(scaled)]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _postprocess(self, item: Item, image):
        for use in item.postprocess:
            entry = self.registry.require("postprocessor", use.name)
            processor = entry.obj
            with plugin_errors(entry):
                image = processor.apply(image, processor.parse_options(use.options), item)
        return image


def add_kwargs(into: dict, more: dict) -> None:
    """Merge extension keyword arguments: values under one key add up (ControlNet residuals sum)."""
    for key, value in more.items():
        if key not in into or into[key] is None:
            into[key] = value
        elif value is None or isinstance(value, bool):  # flags (FLUX's controlnet_blocks_repeat): any set
            into[key] = into[key] or value
        elif isinstance(value, (list, tuple)):
            into[key] = [a + b for a, b in zip(into[key], value)]
        else:
            into[key] = into[key] + value


def _denoised_timesteps(scheduler, steps: int, strength: float | None):
    """The timesteps to run: all of them, or the last ``strength`` fraction (img2img, as diffusers does)."""
    if strength is None:
        return scheduler.timesteps
    begin = max(steps - min(int(steps * strength), steps), 0) * scheduler.order
    if begin >= len(scheduler.timesteps):
        raise ValueError(f"img2img strength {strength} leaves no denoising step at {steps} steps")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]


def _step_kwargs(scheduler, generators) -> dict:
    """Pass per-item generators to schedulers that draw noise while stepping."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "generator" in params:
        kwargs["generator"] = generators if len(generators) > 1 else generators[0]
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs


def _seed_noise_sampler(scheduler, items) -> None:
    """SDE samplers draw Brownian noise from a seed list: one seed per item keeps rows independent."""
    if hasattr(scheduler, "noise_sampler_seed"):
        scheduler.noise_sampler_seed = [int(item.seed) for item in items]


def _to_pils(images: torch.Tensor) -> list:
    """Images (rows, 3, H, W) in 0..1 as PIL images: rounded on the device, moved to the host once."""
    from PIL import Image

    arrays = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in arrays]


def apply_speed_options(model: Model) -> None:
    """The job's ``speed:`` options on a loaded model: channels-last layout, then torch.compile of the denoiser.

    ``nn.Module.compile`` compiles in place, so ``model.unet`` stays the module plugins know."""
    options = model.info.memory
    if options.get("channels_last"):  # the convolutional parts (a transformer's are its patch embeddings only)
        for name in ("unet", "vae", "decoder"):
            if model.components.get(name) is not None:
                model.components[name].to(memory_format=torch.channels_last)
    if options.get("compile", "off") != "off":
        mode = options["compile"]
        model.denoiser.compile(mode=None if mode == "default" else mode,
                               backend=options.get("compile_backend", "inductor"))


def decode_rows(model: Model, shape) -> int:
    """Rows per VAE decode call: one on the CPU (rows stay independent, and memory flat); on a GPU the
    job's ``speed.decode_batch``, else as many as fit in a quarter of the GPU's memory (``memory.vae_slicing``:
    one). The GPU's total memory, not what is free now, so a re-run or a resume on the same kind of GPU
    decodes in the same chunks, with the same kernels and so the same pixels."""
    rows = shape[0]
    if str(model.device) == "cpu" or model.info.memory.get("vae_slicing"):
        return 1
    if model.info.memory.get("decode_batch"):
        return min(rows, model.info.memory["decode_batch"])
    if not torch.cuda.is_available() or not str(model.device).startswith("cuda"):
        return rows
    total = torch.cuda.get_device_properties(torch.device(model.device)).total_memory
    height, width = shape[-2] * model.vae_scale_factor, shape[-1] * model.vae_scale_factor
    # the decoder's peak: a few full-resolution activations of its widest full-size block (128 ch at SD scale)
    per_row = 6 * height * width * 128 * torch.finfo(model.dtype).bits // 8
    return max(1, min(rows, total // 4 // per_row))
