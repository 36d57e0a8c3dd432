"""Built-in model families: Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5 and FLUX.1.

Each family does what its diffusers pipeline does, step for step, so that sdbatch's pixels
equal the pipeline's for the same prompt, seed, steps, guidance and sampler (tests check
it on tiny models of each architecture). What sdbatch adds is per-item rows: every item
has its own noise, guidance scale and conditioning, never shared with its batch.
"""

from __future__ import annotations

import inspect

from sdbatch import hookimpl
from sdbatch.api import Family

ALL_CAPABILITIES = frozenset({"cfg", "negative_prompt", "clip_skip", "controlnet", "img2img", "inpaint",
                              "text_edit", "local_basis", "sega", "attention"})
T5_LIMIT = "t5_tokens applies to families with a T5 encoder (SD3/3.5, FLUX.1); {name} has none"


# ---------------------------------------------------------------- SD 1.x / 2.x
class StableDiffusion(Family):
    """SD 1.x and 2.x: one CLIP text encoder, a U-Net, an 8x VAE."""

    name = "sd1"
    description = "Stable Diffusion 1.x/2.x"
    pipeline = "StableDiffusionPipeline"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                        "StableDiffusionInpaintPipeline", "StableDiffusionControlNetPipeline")
    components = ("unet", "vae", "text_encoder", "tokenizer")
    capabilities = ALL_CAPABILITIES
    limits = {"t5": T5_LIMIT.format(name="Stable Diffusion 1.x/2.x")}
    defaults = {"width": 512, "height": 512, "steps": 20, "guidance": 7.0, "sampler": "Euler a"}

    def matches_keys(self, keys) -> bool:
        return any(k.startswith("cond_stage_model.") for k in keys) and any(
            k.startswith("model.diffusion_model.input_blocks.") for k in keys)

    def load_kwargs(self, memory: dict) -> dict:
        return {"safety_checker": None, "requires_safety_checker": False}

    def encode_prompt(self, model, text: str, options: dict) -> dict:
        return self.encode_prompts(model, [text], options)[0]

    def encode_prompts(self, model, texts: list, options: dict) -> list:
        # A1111 prompt syntax: (word:1.2) weights, BREAK, any length as 75-token chunks (<lora:...> tags
        # dropped); on a GPU all prompts' chunks go through the encoder in fixed-shape calls
        from .prompts import clip_encoder, encode_many, rows_per_call

        encoder = clip_encoder(model.text_encoder, options.get("clip_skip", 1))
        encoded = encode_many(model.tokenizer, encoder, texts, group=rows_per_call(model.device))
        return [{"encoder_hidden_states": hidden.to(model.dtype)} for hidden, _ in encoded]

    def unet_inputs(self, model, x, cond: dict, width: int, height: int) -> dict:
        """The U-Net's conditioning keyword arguments (ControlNets take the same)."""
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}

    def denoise(self, model, x, t, cond: dict, guidance, width: int = 0, height: int = 0, **kwargs):
        return model.unet(x, t, return_dict=False, **self.unet_inputs(model, x, cond, width, height), **kwargs)[0]

    controlnet_class = "ControlNetModel"
    controlnet_fit = {"cross_attention_dim": "cross-attention size", "block_out_channels": "block channels",
                      "layers_per_block": "layers per block"}

    def control(self, model, net, x, t, cond: dict, guidance, control, width: int, height: int) -> dict:
        down, mid = net(x, t, controlnet_cond=control, conditioning_scale=1.0, return_dict=False,
                        **self.unet_inputs(model, x, cond, width, height))
        return {"down_block_additional_residuals": list(down), "mid_block_additional_residual": mid}


# ---------------------------------------------------------------- SDXL
class StableDiffusionXL(StableDiffusion):
    """SDXL: two CLIP encoders (states concatenated, pooled from the second) and size micro-conditioning."""

    name = "sdxl"
    description = "Stable Diffusion XL"
    pipeline = "StableDiffusionXLPipeline"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                        "StableDiffusionXLInpaintPipeline", "StableDiffusionXLControlNetPipeline")
    components = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    capabilities = frozenset({"cfg", "negative_prompt", "clip_skip", "controlnet", "img2img", "inpaint", "text_edit",
                              "local_basis", "sega", "attention"})
    limits = {"t5": T5_LIMIT.format(name="Stable Diffusion XL")}
    defaults = {"width": 1024, "height": 1024, "steps": 30, "guidance": 5.0, "sampler": "Euler"}

    def matches_keys(self, keys) -> bool:
        return any(k.startswith("conditioner.embedders.1.") for k in keys)

    def load_kwargs(self, memory: dict) -> dict:
        return {}

    def encode_prompts(self, model, texts: list, options: dict) -> list:
        # Each encoder's penultimate layer (Clip skip 2 goes one further), as the pipeline and A1111 do,
        # with A1111's prompt syntax and 75-token chunks; the pooled embedding is CLIP-G's first chunk's.
        # The tokenizers may split a prompt into different chunk counts: the shorter side gets ""'s chunks.
        import torch

        from .prompts import clip_encoder, encode_many, rows_per_call

        group = rows_per_call(model.device)
        sides = [(tokenizer, clip_encoder(text_encoder, options.get("clip_skip", 1), penultimate=True))
                 for tokenizer, text_encoder in ((model.tokenizer, model.text_encoder),
                                                 (model.tokenizer_2, model.text_encoder_2))]
        encoded = [encode_many(tokenizer, encoder, texts, group=group) for tokenizer, encoder in sides]
        empties: dict = {}

        def padded(side: int, hidden, chunks: int):
            if len(hidden) == chunks:
                return hidden
            if side not in empties:
                empties[side] = encode_many(*sides[side], [""], group=group)[0][0]
            return torch.cat([hidden, *[empties[side]] * ((chunks - len(hidden)) // len(empties[side]))])

        results = []
        for (first, _), (second, pooled) in zip(*encoded):
            longest = max(len(first), len(second))
            states = torch.cat([padded(0, first, longest), padded(1, second, longest)], dim=-1)
            results.append({"encoder_hidden_states": states.to(model.dtype), "text_embeds": pooled.to(model.dtype)})
        return results

    def unet_inputs(self, model, x, cond: dict, width: int, height: int) -> dict:
        import torch

        # original size, crop top-left, target size: the image's own size, no crop (the pipeline's default)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=x.device,
                                dtype=cond["encoder_hidden_states"].dtype).repeat(len(x), 1)
        return {"encoder_hidden_states": cond["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": time_ids}}

    def prepare(self, model) -> None:
        # SDXL's VAE overflows in float16 (black or NaN images): decode in float32 unless the VAE is fp16-safe.
        import torch

        if model.dtype == torch.float16 and model.vae.config.get("force_upcast", False):
            model.vae.to(torch.float32)


# ---------------------------------------------------------------- flow-matching transformers
class _FlowFamily(Family):
    """Shared by SD3 and FLUX.1: flow matching, a transformer denoiser, a 16-channel VAE with shift."""

    sampler_kind = "flow"
    limits = {
        "local_basis": "local-basis edits need a U-Net mid-block; {name} has a transformer and none",
        "attention": "attention interpolation swaps U-Net cross-attention processors; {name} has joint attention",
        "clip_skip": "{name} takes no Clip skip option",
    }

    def why_not(self, capability: str) -> str:
        return super().why_not(capability).format(name=self.description)

    def control_latents(self, model, maps, shift: bool = True):
        """The maps' VAE latents as the ControlNet pipelines make them, from the posterior's mean.

        The pipelines sample the posterior (SD3 from the global generator, FLUX.1 from the
        item's, before its noise); the mean keeps pixels a function of the item alone and a
        scale-0 ControlNet equal to none. Rows are encoded one at a time (batch independence)."""
        import torch

        vae = model.vae
        offset = (getattr(vae.config, "shift_factor", None) or 0.0) if shift else 0.0
        with torch.inference_mode():
            rows = [vae.encode(row[None].to(vae.dtype) * 2 - 1).latent_dist.mode() for row in maps]
        return ((torch.cat(rows) - offset) * vae.config.scaling_factor).to(model.dtype)

    def _mu(self, scheduler, image_seq_len: int) -> float:
        """The resolution-dependent shift of dynamic-shifting schedules (the pipelines' calculate_shift)."""
        config = scheduler.config
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (max_shift - base_shift) / (max_len - base_len)
        return image_seq_len * slope + (base_shift - slope * base_len)


class StableDiffusion3(_FlowFamily):
    """SD3/SD3.5: CLIP-L + CLIP-G + T5 (optional), MMDiT transformer, flow matching."""

    name = "sd3"
    description = "Stable Diffusion 3/3.5"
    pipeline = "StableDiffusion3Pipeline"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                        "StableDiffusion3InpaintPipeline", "StableDiffusion3ControlNetPipeline")
    components = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                  "tokenizer", "tokenizer_2", "tokenizer_3")
    capabilities = frozenset({"cfg", "negative_prompt", "clip_skip", "controlnet", "img2img", "inpaint",
                              "text_edit", "sega", "t5"})
    limits = {**_FlowFamily.limits, "clip_skip": "{name}: clip_skip applies to its CLIP encoders only"}
    controlnet_class = "SD3ControlNetModel"
    controlnet_fit = {"attention_head_dim": "attention head size", "num_attention_heads": "attention heads",
                      "patch_size": "patch size", "in_channels": "latent channels"}
    defaults = {"width": 1024, "height": 1024, "steps": 28, "guidance": 4.5, "sampler": "Flow Euler"}
    #: T5 tokens, as the pipeline's max_sequence_length default.
    t5_length = 256

    def matches_keys(self, keys) -> bool:
        return any(k.startswith(("model.diffusion_model.joint_blocks.", "joint_blocks.")) for k in keys)

    def load_kwargs(self, memory: dict) -> dict:
        # Without T5 the model takes a fraction of the memory (the pipeline feeds zeros in its place).
        return {"text_encoder_3": None, "tokenizer_3": None} if memory.get("t5") == "off" else {}

    def encode_prompt(self, model, text: str, options: dict) -> dict:
        # A1111 syntax on every encoder: CLIP-L and CLIP-G read the first 77-token chunk (as the
        # pipeline does), T5 the whole prompt up to t5_tokens; weights use A1111's emphasis on each.
        import torch

        from .prompts import clip_encoder, encode_t5, first_chunk

        skip = options.get("clip_skip", 1)
        clip_l, pooled_l = first_chunk(model.tokenizer, clip_encoder(model.text_encoder, skip, penultimate=True), text)
        clip_g, pooled_g = first_chunk(model.tokenizer_2, clip_encoder(model.text_encoder_2, skip, penultimate=True),
                                       text)
        width = model.transformer.config.joint_attention_dim
        clip = torch.nn.functional.pad(torch.cat([clip_l, clip_g], dim=-1), (0, width - clip_l.shape[-1] - clip_g.shape[-1]))
        length = options.get("t5_tokens") or self.t5_length
        if model.components.get("text_encoder_3") is not None:
            t5 = encode_t5(model.text_encoder_3, model.tokenizer_3, text, length)
        else:
            t5 = torch.zeros(length, width, device=model.device, dtype=clip.dtype)
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2).to(model.dtype),
                "pooled_projections": torch.cat([pooled_l, pooled_g], dim=-1).to(model.dtype)}

    def set_timesteps(self, model, scheduler, steps: int, width: int, height: int) -> None:
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            patch = model.transformer.config.patch_size
            factor = model.vae_scale_factor
            kwargs["mu"] = self._mu(scheduler, (height // factor // patch) * (width // factor // patch))
        scheduler.set_timesteps(steps, device=model.device, **kwargs)

    def denoise(self, model, x, t, cond: dict, guidance, width: int = 0, height: int = 0, **kwargs):
        return model.transformer(hidden_states=x, timestep=t.expand(len(x)),
                                 encoder_hidden_states=cond["encoder_hidden_states"],
                                 pooled_projections=cond["pooled_projections"], return_dict=False, **kwargs)[0]

    def control_input(self, model, net, maps, generators):
        # InstantX's SD3 ControlNets were trained on unshifted latents and zero pooled vectors
        return self.control_latents(model, maps, shift=not net.config.force_zeros_for_pooled_projection)

    def control(self, model, net, x, t, cond: dict, guidance, control, width: int, height: int) -> dict:
        import torch

        pooled = cond["pooled_projections"]
        if net.config.force_zeros_for_pooled_projection:
            pooled = torch.zeros_like(pooled)
        # SD3.5's own ControlNets take no text states (no joint_attention_dim)
        states = cond["encoder_hidden_states"] if net.config.joint_attention_dim is not None else None
        samples = net(hidden_states=x, timestep=t.expand(len(x)), encoder_hidden_states=states,
                      pooled_projections=pooled, controlnet_cond=control, conditioning_scale=1.0, return_dict=False)[0]
        return {"block_controlnet_hidden_states": list(samples)}


class Flux(_FlowFamily):
    """FLUX.1: pooled CLIP + T5, guidance-distilled (guidance is an input, no unconditional pass), packed latents."""

    name = "flux"
    description = "FLUX.1"
    pipeline = "FluxPipeline"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxControlNetPipeline")
    components = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    capabilities = frozenset({"controlnet", "img2img", "text_edit", "t5"})
    controlnet_class = "FluxControlNetModel"
    controlnet_fit = {"attention_head_dim": "attention head size", "num_attention_heads": "attention heads",
                      "joint_attention_dim": "text state size", "in_channels": "latent channels"}
    limits = {**_FlowFamily.limits,
              "cfg": "FLUX.1 is guidance-distilled: guidance is an input to the model, not a second pass",
              "negative_prompt": "FLUX.1 takes no negative prompt (it has no unconditional pass)",
              "sega": "semantic guidance needs an unconditional pass; FLUX.1 has none",
              "inpaint": "inpainting on FLUX.1 needs the FLUX.1 Fill model, which sdbatch does not run yet",
              "clip_skip": "FLUX.1 takes no Clip skip option"}
    defaults = {"width": 1024, "height": 1024, "steps": 28, "guidance": 3.5, "sampler": "Flow Euler"}
    #: T5 tokens, as the pipeline's max_sequence_length default.
    t5_length = 512

    def matches_keys(self, keys) -> bool:
        return any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys)

    def encode_prompt(self, model, text: str, options: dict) -> dict:
        # A1111 syntax: T5 reads the whole prompt (up to t5_tokens) with its weights; CLIP's pooled
        # vector comes from the first 77-token chunk (a pooled vector has no tokens to weight)
        from .prompts import clip_encoder, encode_t5, first_chunk

        _, pooled = first_chunk(model.tokenizer, clip_encoder(model.text_encoder), text, emphasis=False)
        t5 = encode_t5(model.text_encoder_2, model.tokenizer_2, text, options.get("t5_tokens") or self.t5_length)
        return {"encoder_hidden_states": t5.to(model.dtype), "pooled_projections": pooled.to(model.dtype)}

    def uses_cfg(self, model) -> bool:
        return False

    def _latent_size(self, model, width: int, height: int) -> tuple:
        factor = model.vae_scale_factor * 2  # the VAE's 8x, then 2x2 patches
        return 2 * (height // factor), 2 * (width // factor)

    def latent_shape(self, model, width: int, height: int) -> tuple:
        h, w = self._latent_size(model, width, height)
        return (model.transformer.config.in_channels // 4, h, w)

    def pack(self, model, latents):
        rows, channels, h, w = latents.shape
        packed = latents.view(rows, channels, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return packed.reshape(rows, (h // 2) * (w // 2), channels * 4)

    def unpack(self, model, latents, width: int, height: int):
        rows, _, channels = latents.shape
        h, w = self._latent_size(model, width, height)
        unpacked = latents.view(rows, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return unpacked.reshape(rows, channels // 4, h, w)

    def set_timesteps(self, model, scheduler, steps: int, width: int, height: int) -> None:
        import numpy as np

        h, w = self._latent_size(model, width, height)
        kwargs = {}
        params = inspect.signature(scheduler.set_timesteps).parameters
        if "sigmas" in params and not scheduler.config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        if "mu" in params and scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = self._mu(scheduler, (h // 2) * (w // 2))
        scheduler.set_timesteps(steps, device=model.device, **kwargs)

    def _image_ids(self, model, width: int, height: int, dtype):
        import torch

        h, w = self._latent_size(model, width, height)
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
        ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3).to(model.device, dtype)

    def _inputs(self, model, module, x, t, cond: dict, guidance, width: int, height: int) -> dict:
        """The keyword arguments FLUX.1's transformer and its ControlNets share."""
        import torch

        states = cond["encoder_hidden_states"]
        embed = guidance.to(model.device, torch.float32) if module.config.guidance_embeds else None
        return {"hidden_states": x, "timestep": t.expand(len(x)).to(x.dtype) / 1000, "guidance": embed,
                "pooled_projections": cond["pooled_projections"], "encoder_hidden_states": states,
                "txt_ids": torch.zeros(states.shape[1], 3, device=model.device, dtype=states.dtype),
                "img_ids": self._image_ids(model, width, height, states.dtype)}

    def denoise(self, model, x, t, cond: dict, guidance, width: int = 0, height: int = 0, **kwargs):
        inputs = self._inputs(model, model.transformer, x, t, cond, guidance, width, height)
        return model.transformer(**inputs, return_dict=False, **kwargs)[0]

    def control_input(self, model, net, maps, generators):
        if net.input_hint_block is not None:  # XLabs' nets read the image itself, in -1..1
            return (maps * 2 - 1).to(model.dtype)
        return self.pack(model, self.control_latents(model, maps))  # InstantX-style: packed latents

    def control(self, model, net, x, t, cond: dict, guidance, control, width: int, height: int) -> dict:
        inputs = self._inputs(model, net, x, t, cond, guidance, width, height)
        double, single = net(**inputs, controlnet_cond=control, conditioning_scale=1.0, return_dict=False)
        kwargs = {"controlnet_block_samples": list(double), "controlnet_blocks_repeat": net.input_hint_block is not None}
        if single is not None:
            kwargs["controlnet_single_block_samples"] = list(single)
        return kwargs


FAMILIES = (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())
ALIASES = {"sd1": ("sd15", "sd2", "sd21"), "sdxl": ("sd-xl",), "sd3": ("sd35", "sd3.5"), "flux": ("flux1", "flux.1")}


@hookimpl(trylast=True)
def register_families(register):
    """SD 1.x/2.x, SDXL, SD3/3.5 and FLUX.1."""
    for family in FAMILIES:
        register(family, aliases=ALIASES.get(family.name, ()))
