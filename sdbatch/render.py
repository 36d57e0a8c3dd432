"""The renderer: a batch of items in, one PIL image per item out, in numbered steps.

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

from .api import Item
from .latents import initial_noise, item_generator
from .models import Model, ModelCache, resolve_device
from .plugins import plugin_errors
from .rows import make_rows_independent, row_independent_kernels


@dataclass
class Conditioning:
    """What conditioners produce for one batch (rows in item order)."""

    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    latents: list = field(default_factory=list)  # per item: initial latents, or None for seeded noise
    unet_kwargs: dict = field(default_factory=dict)  # extra keyword arguments for the denoiser
    latent_edits: dict = field(default_factory=dict)  # row -> (step index, delta added to its latents there)
    noise_terms: list = field(default_factory=list)  # callables adding guidance after CFG (e.g. SEGA)
    extra: dict = field(default_factory=dict)  # anything conditioners share with each other
    outputs: list = field(default_factory=list)  # per item: dict of extra results for writers (directions)
    registry: Any = None  # the plugin registry, for conditioners that use other plugins (samplers, finders)
    controls: list = field(default_factory=list)  # Control objects: ControlNet residuals added at every step
    init_latents: list = field(default_factory=list)  # per item: clean image latents to start from (img2img)
    denoise: float | None = None  # img2img strength, shared by the batch: the fraction of steps run
    inpaint_masks: list = field(default_factory=list)  # per item: latent-size mask, 1 = repaint, or None
    finishers: list = field(default_factory=list)  # per item: callables(PIL image) -> PIL image after decoding


@dataclass
class Control:
    """One ControlNet applied to a batch: its net, a control image per row, and when and how hard.

    ``images`` is (rows, 3, H, W) in 0..1 at the output size; ``scales``, ``starts`` and
    ``ends`` hold one value per row (start/end are fractions of the denoising steps, as
    in the A1111 extension's guidance start/end).
    """

    net: Any
    images: Any
    scales: list
    starts: list
    ends: list


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
            make_rows_independent(model.unet)
            model.extra["batch_invariant"] = True
        return model

    @torch.inference_mode()
    def render(self, items: list[Item]) -> list[Rendered]:
        # 1. check inputs
        keys = {item.batch_key() for item in items}
        if len(keys) != 1:
            raise ValueError(f"a batch must share one batch key, got {len(keys)}")
        padded = self._pad(items)
        model = self.model_for(items[0])
        first = padded[0]
        # 2. encode the conditioning (prompts, control inputs) with the item's conditioners
        cond = self._condition(padded, model)
        # 3. timesteps from a fresh scheduler (schedulers keep per-run state)
        scheduler = self.registry.require("sampler", first.sampler).obj.create(model.scheduler_config)
        scheduler.set_timesteps(first.steps, device=model.device)
        timesteps = _denoised_timesteps(scheduler, first.steps, cond.denoise)
        # 4. initial latents: each item's own noise, scaled for this scheduler (or added to its image)
        generators = [item_generator(item.seed) for item in padded]
        noise = self._initial_latents(padded, model, cond, generators)
        latents = self._start(scheduler, timesteps, noise, cond)
        # 5. denoising loop with per-item classifier-free guidance
        latents = self._denoise(padded, model, scheduler, timesteps, latents, noise, cond, generators)
        # 6. decode latents to pixels
        images = self._decode(model, latents)
        # 7. post-process: to PIL, finishers (inpaint overlay), then the item's post-processors
        results = []
        for row, (item, image) in enumerate(zip(items, images)):
            pil = _to_pil(image)
            for finish in cond.finishers[row]:
                pil = finish(pil)
            pil = self._postprocess(item, pil)
            results.append(Rendered(item, pil, model.hash, outputs=cond.outputs[row]))
        return results

    def _pad(self, items: list[Item]) -> list[Item]:
        size = self.pad_batches_to
        if not size or len(items) >= size:
            return list(items)
        return list(items) + [items[-1]] * (size - len(items))

    def _condition(self, items: list[Item], model: Model) -> Conditioning:
        rows = len(items)
        cond = Conditioning(latents=[None] * rows, outputs=[{} for _ in items], registry=self.registry,
                            init_latents=[None] * rows, inpaint_masks=[None] * rows, finishers=[[] for _ in items])
        for position, use in enumerate(items[0].conditioners):
            entry = self.registry.require("conditioner", use.name)
            conditioner = entry.obj
            with plugin_errors(entry):
                options = [conditioner.parse_options(item.conditioners[position].options) for item in items]
                conditioner.condition(items, options, model, cond)
        if cond.prompt_embeds is None:
            raise ValueError("no conditioner produced prompt embeddings (add 'text' to conditioners)")
        return cond

    def _initial_latents(self, items, model: Model, cond: Conditioning, generators) -> torch.Tensor:
        factor = model.vae_scale_factor
        rows = []
        for item, given, generator in zip(items, cond.latents, generators):
            shape = (model.latent_channels, item.height // factor, item.width // factor)
            rows.append(given if given is not None else initial_noise(item.seed, shape, generator))
        return torch.stack(rows).to(model.device, model.dtype)

    def _start(self, scheduler, timesteps, noise: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x at the first step: noise times the scheduler's sigma, or an image noised to the start timestep."""
        if cond.denoise is None:
            return noise * scheduler.init_noise_sigma
        if any(init is None for init in cond.init_latents):
            raise ValueError("img2img needs an image for every item of the batch")
        clean = torch.stack(cond.init_latents).to(noise.device, noise.dtype)
        return scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(noise)))

    def _denoise(self, items, model: Model, scheduler, timesteps, latents, noise, cond: Conditioning, generators):
        guidance = torch.tensor([item.guidance for item in items], device=model.device, dtype=model.dtype)
        guidance = guidance.view(-1, 1, 1, 1)
        use_cfg = guidance > 1.0
        any_cfg = bool(use_cfg.any())
        embeds = cond.prompt_embeds
        if any_cfg:
            embeds = torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds])
        step_kwargs = _step_kwargs(scheduler, generators)
        _seed_noise_sampler(scheduler, items)
        inpaint = _Inpaint.of(cond, model, latents)
        with row_independent_kernels(model.device, self.batch_invariant):
            for step, t in enumerate(timesteps):
                for row, (at_step, delta) in cond.latent_edits.items():
                    if at_step == step:  # an edit moves this row's x_t, then sampling goes on from there
                        latents[row] = latents[row] + delta.to(latents.device, latents.dtype)
                model_input = torch.cat([latents, latents]) if any_cfg else latents
                model_input = scheduler.scale_model_input(model_input, t)
                unet_kwargs = {**cond.unet_kwargs, **_control_residuals(cond.controls, model_input, t, embeds,
                                                                        step, len(timesteps), any_cfg)}
                unet_input = inpaint.unet_input(model_input) if inpaint else model_input
                prediction = model.unet(unet_input, t, encoder_hidden_states=embeds, return_dict=False,
                                        **unet_kwargs)[0]
                if any_cfg:
                    uncond, text = prediction.chunk(2)
                    # Items with guidance <= 1 take the conditional prediction, as they would alone.
                    prediction = torch.where(use_cfg, uncond + guidance * (text - uncond), text)
                    for term in cond.noise_terms:  # term(step, t, scaled latents, uncond, text) -> addition
                        prediction = prediction + term(step, t, model_input[: len(latents)], uncond, text)
                latents = scheduler.step(prediction, t, latents, **step_kwargs, return_dict=False)[0]
                if inpaint:
                    next_t = timesteps[step + 1] if step + 1 < len(timesteps) else None
                    latents = inpaint.keep_unmasked(scheduler, latents, noise, next_t)
        return latents

    def _decode(self, model: Model, latents: torch.Tensor) -> torch.Tensor:
        vae = model.vae
        scaled = latents / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            scaled = scaled + vae.config.shift_factor
        # Decode one row at a time: the VAE is the memory peak, and rows stay independent.
        images = torch.cat([vae.decode(row[None].to(vae.dtype), return_dict=False)[0] for row in scaled])
        return (images / 2 + 0.5).clamp(0, 1)

    def _postprocess(self, item: Item, image):
        for use in item.postprocess:
            entry = self.registry.require("postprocessor", use.name)
            processor = entry.obj
            with plugin_errors(entry):
                image = processor.apply(image, processor.parse_options(use.options), item)
        return image


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


def _control_residuals(controls: list, model_input, t, embeds, step: int, total: int, any_cfg: bool) -> dict:
    """Summed ControlNet residuals for the U-Net at this step (several nets add up, as in diffusers).

    A net is on for a row while ``start <= step/total`` and ``(step+1)/total <= end``; its
    residuals are scaled per row, so one batch can sweep the control scale.
    """
    down, mid = None, None
    for control in controls:
        weights = [scale if (step / total >= start and (step + 1) / total <= end) else 0.0
                   for scale, start, end in zip(control.scales, control.starts, control.ends)]
        if not any(weights):
            continue
        images = control.images.to(model_input.device, model_input.dtype)
        weight = torch.tensor(weights, device=model_input.device, dtype=model_input.dtype)
        if any_cfg:
            images, weight = torch.cat([images, images]), torch.cat([weight, weight])
        weight = weight.view(-1, 1, 1, 1)
        net_down, net_mid = control.net(model_input, t, encoder_hidden_states=embeds, controlnet_cond=images,
                                        conditioning_scale=1.0, return_dict=False)
        net_down = [residual * weight for residual in net_down]
        net_mid = net_mid * weight
        down = net_down if down is None else [a + b for a, b in zip(down, net_down)]
        mid = net_mid if mid is None else mid + net_mid
    if down is None:
        return {}
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class _Inpaint:
    """Inpainting inside the loop: a 9-channel inpainting U-Net gets mask and masked image as
    extra input channels; any other U-Net keeps the unmasked area on the original image's
    trajectory after every step (the blend diffusers uses for plain models)."""

    def __init__(self, masks, clean, model):
        self.masks, self.clean = masks, clean
        self.extra_channels = None
        if model.unet.config.in_channels == 9:
            masked = clean * (1 - masks)  # latents of the image with the repaint area blanked
            self.extra_channels = torch.cat([masks, masked], dim=1)

    @classmethod
    def of(cls, cond: Conditioning, model: Model, latents):
        if not cond.inpaint_masks or all(mask is None for mask in cond.inpaint_masks):
            return None
        if any(mask is None for mask in cond.inpaint_masks) or any(i is None for i in cond.init_latents):
            raise ValueError("inpainting needs an image and a mask for every item of the batch")
        masks = torch.stack(cond.inpaint_masks).to(latents.device, latents.dtype)
        clean = torch.stack(cond.init_latents).to(latents.device, latents.dtype)
        return cls(masks, clean, model)

    def unet_input(self, model_input):
        if self.extra_channels is None:
            return model_input
        extra = self.extra_channels.repeat(len(model_input) // len(self.extra_channels), 1, 1, 1)
        return torch.cat([model_input, extra.to(model_input.dtype)], dim=1)

    def keep_unmasked(self, scheduler, latents, noise, next_t):
        if self.extra_channels is not None:
            return latents
        if next_t is None:
            known = self.clean
        else:
            known = scheduler.add_noise(self.clean, noise.to(latents.device, latents.dtype), next_t.repeat(len(latents)))
        return (1 - self.masks) * known + self.masks * latents


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


def _to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image.float().permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)
