"""DDIM inversion: a real image back to the initial latent that DDIM would turn into it."""

from __future__ import annotations

import torch


def encode_image(model, image) -> torch.Tensor:
    """VAE latents (scaled as the U-Net sees them) of a PIL image resized to the model's grid."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None].to(model.device, model.vae.dtype)
    with torch.inference_mode():
        latents = model.vae.encode(pixels).latent_dist.mean
    shift = getattr(model.vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * model.vae.config.scaling_factor)[0].float().cpu()


def ddim_invert(model, latents: torch.Tensor, conditioning: dict, steps: int, width: int, height: int) -> torch.Tensor:
    """Run DDIM backwards from clean latents to x_T with guidance 1 (Mokady et al. 2022).

    It walks exactly the timesteps the DDIM sampler takes for ``steps`` (any spacing), in
    reverse, using the model's prediction at the current latent for the next one; epsilon
    and v-prediction models both work.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod.double()
    alpha_prev = float(scheduler.final_alpha_cumprod)
    sample = latents[None].to(model.device, model.dtype)
    cond = {name: value[None].to(model.device, model.dtype) for name, value in conditioning.items()}
    guidance = torch.ones(1)
    with torch.inference_mode():
        for t in reversed(scheduler.timesteps):
            alpha = float(alphas[int(t)])
            output = model.family.denoise(model, sample, t, cond, guidance, width, height).double()
            x = sample.double()
            if scheduler.config.prediction_type == "v_prediction":
                eps = alpha_prev**0.5 * output + (1 - alpha_prev) ** 0.5 * x
            else:
                eps = output
            clean = (x - (1 - alpha_prev) ** 0.5 * eps) / alpha_prev**0.5
            sample = (alpha**0.5 * clean + (1 - alpha) ** 0.5 * eps).to(model.dtype)
            alpha_prev = alpha
    return sample[0].float().cpu()


def invert_image_file(model, path: str, sha256: str, prompt: str, conditioning: dict, steps: int, width: int,
                      height: int):
    """x_T of an image file at the item's size, cached per model by content, prompt and steps."""
    from PIL import Image

    key = (model.cache_key, sha256, prompt, steps, width, height)
    cache = model.extra.setdefault("inverted_images", {})
    if key not in cache:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        cache[key] = ddim_invert(model, encode_image(model, image), conditioning, steps, width, height)
    return cache[key]
