"""The GPU render path against diffusers: SD 1.5-sized random weights, images/s and the FLOP ceiling.

    .venv/bin/python bench/bench_gpu.py                      # CUDA, float16, 512x512, 25 steps, batch 1/8/16
    .venv/bin/python bench/bench_gpu.py --compile max-autotune
    .venv/bin/python bench/bench_gpu.py --smoke              # the same code on the CPU at 64x64 (a check)

It builds a model with Stable Diffusion 1.5's U-Net, VAE and CLIP-L shapes and random weights
(no hub needed), then renders the same items with ``StableDiffusionPipeline`` (a list of
prompts, one generator per item) and with sdbatch's Renderer, plain and with ``speed:``
options, at each batch size. It prints images/s, the ratio sdbatch/diffusers from the same
run, peak GPU memory, and the share of the GPU's dense float16 peak the render reaches:
one 512x512 image at 25 steps with classifier-free guidance is about 1.61 * steps + 2.5
TFLOP (U-Net twice per step, then the VAE decoder).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"


def build_sd15_sized(folder: Path) -> Path:
    """A diffusers folder with SD 1.5's architecture and random weights (tokenizer: the test model's)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdbatch.testmodel import build_bpe, write_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vocab, _ = build_bpe()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77, hidden_act="quick_gelu"))
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(folder / "tokenizer-src")))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd15-random")
    return folder / "sd15-random"


def _rate(function, images: int, device: str, repeat: int) -> tuple[float, float]:
    """(images/s, peak GiB) of the best of ``repeat`` timed runs."""
    import torch

    best = float("inf")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else 0.0
    return images / best, peak


def bench(folder: Path, args) -> list[tuple]:
    import diffusers
    import torch

    from sdbatch.job import load_job_text
    from sdbatch.plugins import load_registry
    from sdbatch.render import Renderer

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    registry = load_registry()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype).to(args.device)
    pipe.scheduler = registry.require("sampler", "Euler").obj.create(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for batch in args.batches:
        def theirs():
            pipe([PROMPT] * batch, num_inference_steps=args.steps, guidance_scale=7.5, height=args.size,
                 width=args.size, generator=[torch.Generator(args.device).manual_seed(s) for s in range(batch)],
                 output_type="pil")

        theirs()  # warm up
        rows.append(("diffusers", batch, *_rate(theirs, batch, args.device, args.repeat)))
        for label, speed in args.variants:
            job = load_job_text(f"""
model: {folder}
prompt: "{PROMPT}"
sampler: Euler
steps: {args.steps}
guidance: 7.5
width: {args.size}
height: {args.size}
batch_size: {batch}
speed: {speed}
sweep: {{seed: {{start: 0, count: {batch}}}}}
""", registry)
            renderer = Renderer(registry, args.device, "float16" if args.device == "cuda" else "float32",
                                job.plan.models, pad_batches_to=batch if args.device == "cuda" else None)
            items = list(job.plan)
            renderer.render(items)  # load, compile and warm up
            rows.append((label, batch, *_rate(lambda: renderer.render(items), batch, args.device, args.repeat)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", default="max-autotune", help="torch.compile mode for the compiled variant "
                                                                  "('off' skips it)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense float16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--smoke", action="store_true", help="CPU, 64x64, 2 steps, batches 1,2: checks the script")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.device = "cuda"
    args.variants = [("sdbatch", "{}"), ("sdbatch channels_last", "{channels_last: true}")]
    if args.compile != "off":
        args.variants.append((f"sdbatch compile {args.compile}", f"{{compile: {args.compile}}}"))
    if args.smoke:
        args.device, args.size, args.steps, args.batches, args.repeat = "cpu", 64, 2, [1, 2], 1
        args.variants = [("sdbatch", "{}"), ("sdbatch compile", "{compile: default, compile_backend: aot_eager}")]
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark measures the GPU path (--smoke checks it on the CPU)")
    tflop = 1.61 * args.steps + 2.5  # per 512x512 image with CFG (scales with pixels)
    tflop *= (args.size / 512) ** 2
    with tempfile.TemporaryDirectory() as temp:
        rows = bench(build_sd15_sized(Path(temp)), args)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{name}, SD 1.5-sized random weights, {args.size}x{args.size}, {args.steps} steps, CFG 7.5")
    print(f"{'renderer':34} {'batch':>5} {'img/s':>7} {'vs diffusers':>12} {'peak GiB':>8} {'of peak FLOPs':>13}")
    baseline = {batch: rate for label, batch, rate, _ in rows if label == "diffusers"}
    for label, batch, rate, peak in rows:
        share = rate * tflop / args.peak_tflops
        print(f"{label:34} {batch:>5} {rate:7.2f} {rate / baseline[batch]:11.2f}x {peak:8.2f} {share:12.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
