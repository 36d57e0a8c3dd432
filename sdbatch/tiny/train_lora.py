"""Train sdbatch-tiny's example LoRA: a green tint the base model never draws.

    python -m sdbatch.tiny.train_lora --out sdbatch/tiny/lora

Cheap rather than resumable: 300 steps of batch 8 on one CPU thread (minutes; the record in
``training.json`` says how long it took here). The data are the base model's own procedural
scenes (`sdbatch.tiny.scenes`) with their colours mixed 40% towards green, captioned as they
are; a rank-4 LoRA on the U-Net's attention, feed-forward and convolution layers learns the
tint (diffusion v-loss, as the base was trained; attention alone did not learn a global tint
in 400 steps). Saved in
diffusers' LoRA format (``tint.safetensors``) through diffusers' own ``save_lora_weights``;
tests convert it to kohya's format with diffusers' converters and check the pixels match.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

TINT = np.array([40, 200, 60], np.float32)  # what the scenes are mixed towards
MIX = 0.4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_in", "conv_out"]


def tinted(images: np.ndarray) -> np.ndarray:
    """Scenes (n, H, W, 3) uint8 mixed towards the tint colour."""
    return ((1 - MIX) * images.astype(np.float32) + MIX * TINT).round().astype(np.uint8)


def train(out: Path, steps: int = 300, batch: int = 8, lr: float = 4e-3, scenes: int = 256, seed: int = 0) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from sdbatch.tiny import model_path, scenes as scene_module
    from sdbatch.tiny.train import make_noise_scheduler

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(model_path(), safety_checker=None, requires_safety_checker=False)
    unet, vae = pipe.unet, pipe.vae
    images, captions = scene_module.render_dataset(scenes, seed=1000 + seed)  # scenes the base never saw
    pixels = torch.from_numpy(tinted(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(64)])
        latents = latents * vae.config.scaling_factor
        ids = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        states = torch.cat([pipe.text_encoder(chunk)[0] for chunk in ids.split(64)])
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    noise_sched = make_noise_scheduler("v_prediction")
    generator = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    for step in range(steps):
        pick = torch.randint(0, scenes, (batch,), generator=generator)
        x0 = latents[pick]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        prediction = unet(noise_sched.add_noise(x0, noise, t), t, states[pick]).sample
        loss = torch.nn.functional.mse_loss(prediction, noise_sched.get_velocity(x0, noise, t))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"step {step} loss {np.mean(losses[-50:]):.4f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    layers = get_peft_model_state_dict(unet)  # PEFT keys throughout (convert_state_dict_to_diffusers renames only
    # the attention layers, and diffusers then loads a file of mixed key styles without them)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, weight_name="tint.safetensors")
    record = {"command": "python -m sdbatch.tiny.train_lora --out sdbatch/tiny/lora", "steps": steps, "batch": batch,
              "lr": lr, "scenes": scenes, "seed": seed, "rank": 4, "targets": TARGETS, "tint": TINT.tolist(),
              "mix": MIX, "final_loss": float(np.mean(losses[-50:])), "seconds": round(time.time() - start, 1)}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "lora")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    print(json.dumps(train(args.out, steps=args.steps), indent=2))


if __name__ == "__main__":
    main()
