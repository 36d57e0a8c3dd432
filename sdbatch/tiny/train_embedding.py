"""Train sdbatch-tiny's example textual-inversion embedding: a new word, ``tinysun``.

    python -m sdbatch.tiny.train_embedding --out sdbatch/tiny/embeddings

Textual inversion (Gal et al., 2022) as A1111's "Train" tab does it: the model stays frozen and
only the new word's input vectors (four, started from the initializer word "circle", as
diffusers' textual-inversion example starts from one coarse word) learn, through the text
encoder and the U-Net, to denoise pictures of one concept: a large yellow circle at the top
on a black background (the procedural generator's scenes, which the base model draws only
when given all five words). Captions are templates around the new word and never name the
concept. Diffusion v-loss, as the base was trained. Saved as an A1111 embedding
(``emb_params``, one row per vector) that sdbatch and A1111 load by file name; the record in
``training.json`` says how long it took. Seeded, and cheap rather than resumable (minutes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

WORD = "tinysun"
CONCEPT = {"shape": "circle", "colour": "yellow", "position": "top", "size": "large", "background": "black"}
TEMPLATES = ["{}", "a picture of {}", "an image of {}", "a scene with {}", "{}, a drawing"]
VECTORS = 4
INITIALIZER = "circle"  # a coarse word for the concept; the colour, place, size and background are learned


def concept_images(count: int, seed: int) -> np.ndarray:
    """``count`` scenes of the concept (uint8, n x 64 x 64 x 3), jittered by seed."""
    from sdbatch.tiny import scenes

    return np.stack([scenes.make_single(**CONCEPT, seed=seed + i).image for i in range(count)])


def train(out: Path, steps: int = 800, batch: int = 16, lr: float = 5e-3, images: int = 128, seed: int = 0) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from sdbatch.tiny import model_path
    from sdbatch.tiny.train import make_noise_scheduler

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(model_path(), safety_checker=None, requires_safety_checker=False)
    tokenizer, encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    tokens = [f"<{WORD}-{i}>" for i in range(VECTORS)]
    tokenizer.add_tokens(tokens)
    encoder.resize_token_embeddings(len(tokenizer))
    table = encoder.get_input_embeddings().weight
    new_ids = tokenizer.convert_tokens_to_ids(tokens)
    start_id = tokenizer(INITIALIZER, add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        table[new_ids] = table[start_id].clone()
    frozen = table.detach().clone()
    for module in (unet, vae, encoder):
        module.requires_grad_(False)
    table.requires_grad_(True)

    pixels = torch.from_numpy(concept_images(images, seed=10_000 + seed)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    placeholder = " ".join(tokens)
    captions = [template.format(placeholder) for template in TEMPLATES]
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW([table], lr=lr, weight_decay=0.0)
    noise_sched = make_noise_scheduler("v_prediction")
    generator = torch.Generator().manual_seed(seed)
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[new_ids] = False
    begin, losses = time.time(), []
    for step in range(steps):
        pick = torch.randint(0, images, (batch,), generator=generator)
        caption = torch.randint(0, len(captions), (batch,), generator=generator)
        x0 = latents[pick]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        states = encoder(ids[caption])[0]
        prediction = unet(noise_sched.add_noise(x0, noise, t), t, states).sample
        loss = torch.nn.functional.mse_loss(prediction, noise_sched.get_velocity(x0, noise, t))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # only the new word learns: every other row back to the model's
            table[keep] = frozen[keep]
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"step {step} loss {np.mean(losses[-50:]):.4f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    vectors = table.detach()[new_ids].clone()
    save_file({"emb_params": vectors}, str(out / f"{WORD}.safetensors"))  # A1111's layout
    record = {"command": "python -m sdbatch.tiny.train_embedding --out sdbatch/tiny/embeddings", "word": WORD,
              "concept": CONCEPT, "vectors": VECTORS, "initializer": INITIALIZER, "templates": TEMPLATES, "steps": steps, "batch": batch,
              "lr": lr, "images": images, "seed": seed, "final_loss": float(np.mean(losses[-50:])),
              "seconds": round(time.time() - begin, 1), "threads": 1}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "embeddings")
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args()
    print(json.dumps(train(args.out, steps=args.steps), indent=2))


if __name__ == "__main__":
    main()
