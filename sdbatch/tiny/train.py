"""Train sdbatch-tiny from scratch on procedural scenes, the way latent diffusion was trained.

Stage 1 trains the AutoencoderKL on pixels. Stage 2 freezes it, encodes the dataset once, and
trains the CLIP text encoder and the UNet together on those latents, dropping 10% of captions
so classifier-free guidance works: 2a predicts epsilon, 2b continues from 2a's weights with
v-prediction (epsilon alone left the high-noise steps, where background and layout are
decided, ignoring the prompt), 2c adds a token-identity loss that keeps every caption word
distinguishable at the text encoder's output (without it the position words collapsed and
position stayed at chance) with plain v-MSE, and 2d returns to min-SNR weighting, where
shapes sharpen. Stage 3 fine-tunes only the VAE decoder on whole images; the encoder, hence
the latent space the UNet learned, stays fixed. The export writes a standard diffusers Stable
Diffusion folder that `StableDiffusionPipeline.from_pretrained(path)` loads with no code of
ours.

The documented command (2.5 hours of stage time on one thread, about 2 with --threads 2 on
an otherwise idle 2-core CPU; see model/README.md):

    python -m sdbatch.tiny.train --out sdbatch/tiny/model

Re-running the same command resumes from the last checkpoint in --ckpt (default
.cache/sdbatch-tiny, git-ignored). Every random draw of step k comes from a generator seeded
with (seed, stage, k), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from sdbatch.tiny import scenes

MAX_LENGTH = 77  # CLIP's length: sdbatch and the pipeline pad every prompt to it
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


@dataclass
class Config:
    """Everything that decides the result; written beside the checkpoints."""

    seed: int = 0
    n_scenes: int = 30_000
    vae_steps: int = 1400
    vae_batch: int = 32
    vae_crop: int = 32  # the VAE is fully convolutional: 32x32 crops teach it 4x faster
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5
    # Stage 2a predicts epsilon (learns fast), on a cosine laid out over unet_schedule_steps
    # but stopped at unet_steps; stage 2b switches to v-prediction (as SD 2 did), which keeps
    # the high-noise steps, where background and layout are decided, tied to the prompt.
    unet_steps: int = 1800
    unet_schedule_steps: int = 2500
    vpred_steps: int = 700
    vpred_lr: float = 4e-4
    decoder_steps: int = 500  # stage 3: decoder-only fine-tune on full images
    decoder_batch: int = 16
    decoder_lr: float = 3e-4
    unet_batch: int = 64
    unet_lr: float = 8e-4
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # Stage 2c continues 2b with plain (unweighted) v-MSE and a token-identity loss on the
    # text encoder: without it, words the UNet has not yet learned to use (position words,
    # circle vs square) collapse to near-identical text states, so it never can.
    tune_steps: int = 1000
    tune_lr: float = 4e-4
    token_loss_weight: float = 0.1
    # Stage 2d goes back to min-SNR weighting (which favours the mid-noise steps where
    # shapes form), keeping the token-identity loss.
    refine_steps: int = 2000
    refine_lr: float = 3e-4
    ema_decay: float = 0.998
    checkpoint_every: int = 200
    preview_every: int = 400


# ---------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable character table (byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the lowest-ranked adjacent pair."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(p, math.inf), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        pair = (symbols[i], symbols[i + 1])
        merged, j = [], 0
        while j < len(symbols):
            if j < len(symbols) - 1 and (symbols[j], symbols[j + 1]) == pair:
                merged.append(symbols[j] + symbols[j + 1])
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return symbols


def _merges_for(words: list[str]) -> list[tuple[str, str]]:
    """Merges that make every word one token: add prefix merges until no word splits."""
    merges: list[tuple[str, str]] = []
    for _ in range(20):
        ranks = {m: r for r, m in enumerate(merges)}
        split = [(w, _bpe(w, ranks)) for w in words]
        split = [(w, pieces) for w, pieces in split if len(pieces) > 1]
        if not split:
            return merges
        for _, pieces in split:
            acc = pieces[0]
            for piece in pieces[1:]:
                if (acc, piece) not in ranks:
                    ranks[(acc, piece)] = len(merges)
                    merges.append((acc, piece))
                acc += piece
    raise RuntimeError("could not build merges covering the caption vocabulary")


def build_tokenizer(folder: Path):
    """A CLIPTokenizer whose vocabulary has every caption word as one whole-word token."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = list(_bytes_to_unicode().values())
    merges = _merges_for(scenes.vocabulary())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + list(SPECIALS)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # transformers 5 ignores vocab_file= in the constructor: load from the folder instead.
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH)
    for word in scenes.vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"caption word {word!r} is not a single token: {ids}")
    tok.save_pretrained(str(folder))
    return tok


def tokenize(tok, captions: list[str]) -> torch.Tensor:
    """Token ids (n, 77) padded exactly as StableDiffusionPipeline pads prompts."""
    return tok(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------- models


def make_vae():
    """3-block AutoencoderKL: 64x64x3 <-> 16x16x4 (factor 4 keeps shapes legible in latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=scenes.SIZE,
        # No attention in the mid block: fully convolutional, so crop training transfers.
        mid_block_add_attention=False,
    )


def make_text_encoder(tok):
    """A 3-layer, 64-wide CLIPTextModel (the caption language has ~30 words)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet():
    """UNet on 16x16x4 latents; attention only at 8x8 and 4x4, where it is cheap on CPU."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_noise_scheduler(prediction_type: str = "epsilon"):
    """DDPM's linear betas (1e-4..0.02): at 16x16 SD's scaled_linear leaves too much signal at T."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


# ---------------------------------------------------------------- checkpoints


def _save_ckpt(folder: Path, step: int, modules: dict, optimizer) -> None:
    """Write weights (safetensors) and optimizer state atomically: tmp folder, then rename."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "step.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _load_ckpt(folder: Path, modules: dict, optimizer) -> int:
    """Restore a checkpoint written by _save_ckpt; returns its step (0 if none)."""
    from safetensors.torch import load_file

    if not (folder / "step.json").exists():
        return 0
    for name, module in modules.items():
        module.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return json.loads((folder / "step.json").read_text())["step"]


def resumable_optimizer(params, lr: float, weight_decay: float, schedule, folder: Path, modules: dict):
    """AdamW and its LR schedule, restored from the checkpoint in `folder` if there is one.

    Returns (optimizer, scheduler, first step). The schedule is placed at the restored step
    directly, so a resumed run follows the same LR curve as an unbroken one.
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    start = _load_ckpt(folder, modules, opt)
    sched.last_epoch = start
    for group, base in zip(opt.param_groups, sched.base_lrs):
        group["lr"] = base * schedule(start)
    return opt, sched, start


def _lr_lambda(total: int, warmup: int = 100):
    """Linear warm-up, then cosine decay to 10% of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """Per-step generator: resuming at step k draws what an unbroken run drew at step k."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_000_007 + step)


class LossLog:
    """Appends `stage,step,loss,lr,seconds` rows to a CSV in the checkpoint folder."""

    def __init__(self, path: Path):
        self.path = path
        if not path.exists():
            path.write_text("stage,step,loss,lr,seconds\n")

    def write(self, stage: str, step: int, loss: float, lr: float, seconds: float) -> None:
        with self.path.open("a") as f:
            f.write(f"{stage},{step},{loss:.5f},{lr:.2e},{seconds:.1f}\n")


# ---------------------------------------------------------------- stage 1: VAE


def _pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _random_crops(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """One crop per image at a random offset that is a multiple of 4 (the VAE's stride)."""
    n, _, h, w = x.shape
    offs = torch.randint(0, (h - size) // 4 + 1, (n, 2), generator=g) * 4
    return torch.stack([x[i, :, a : a + size, b : b + size] for i, (a, b) in enumerate(offs.tolist())])


def train_vae(cfg: Config, images: np.ndarray, ckpt: Path, log: LossLog):
    """Stage 1: L1 + MSE reconstruction and a small KL term, on random crops."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    vae = make_vae()
    folder = ckpt / "vae_ckpt"
    opt, sched, start = resumable_optimizer(vae.parameters(), cfg.vae_lr, 0.0, _lr_lambda(cfg.vae_steps), folder, {"vae": vae})
    elapsed = _stage_seconds(ckpt, "vae")
    t0 = time.time()
    bar = tqdm(range(start, cfg.vae_steps), desc="vae", initial=start, total=cfg.vae_steps, mininterval=30)
    for step in bar:
        g = _step_generator(cfg.seed, 1, step)
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g)
        x = _random_crops(_pixels(images[idx.numpy()]), cfg.vae_crop, g)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        rec_loss = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec_loss + cfg.kl_weight * kl
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{rec_loss.item():.4f}", refresh=False)
        if step % 10 == 0:
            log.write("vae", step, rec_loss.item(), sched.get_last_lr()[0], elapsed + time.time() - t0)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            _save_ckpt(folder, step + 1, {"vae": vae}, opt)
            _record_stage(ckpt, "vae", elapsed + time.time() - t0)
    return vae.eval()


@torch.no_grad()
def encode_dataset(vae, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior mean and std of every image, and SD's scaling_factor = 1 / std(latents)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(_pixels(images[i : i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    sample = mean[:4096] + std[:4096] * torch.randn(mean[:4096].shape, generator=torch.Generator().manual_seed(0))
    return mean, std, float(1.0 / sample.std())


def _cached_latents(vae, images: np.ndarray, ckpt: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """encode_dataset, saved once in the checkpoint folder so a resumed run skips it."""
    from safetensors.torch import load_file, save_file

    path = ckpt / "latents.safetensors"
    if path.exists():
        d = load_file(str(path))
        return d["mean"], d["std"], float(d["scaling"])
    mean, std, scaling = encode_dataset(vae, images)
    save_file({"mean": mean.contiguous(), "std": std.contiguous(), "scaling": torch.tensor(scaling)}, str(path))
    return mean, std, scaling


# ---------------------------------------------------------------- stage 2: text encoder + UNet


class EMA:
    """Exponential moving average of parameters, with the usual (1+k)/(10+k) warm-up."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}


def _snr_weights(noise_sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, g)/SNR for eps, /(SNR+1) for v."""
    ac = noise_sched.alphas_cumprod[t]
    snr = ac / (1 - ac)
    if noise_sched.config.prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


@dataclass(frozen=True)
class Phase:
    """One part of stage 2: what it predicts, where it checkpoints, what it starts from."""

    name: str  # progress bar, loss log and timing.json key
    prediction: str
    folder: str
    stage_id: int  # generator stream, so each phase draws its own batches
    source: str | None  # phase whose raw weights it continues (None: random init)
    weighting: str  # "min_snr" or "uniform"
    token_loss: bool  # add the text encoder's token-identity loss
    steps_field: str  # the Config fields with its step count and peak LR
    lr_field: str


PHASES = {
    "eps": Phase("unet", "epsilon", "unet_ckpt", 2, None, "min_snr", False, "unet_steps", "unet_lr"),
    "v": Phase("unet_v", "v_prediction", "unet_v_ckpt", 4, "eps", "min_snr", False, "vpred_steps", "vpred_lr"),
    "tune": Phase("unet_tune", "v_prediction", "unet_tune_ckpt", 5, "v", "uniform", True, "tune_steps", "tune_lr"),
    "refine": Phase(
        "unet_refine", "v_prediction", "unet_refine_ckpt", 6, "tune", "min_snr", True, "refine_steps", "refine_lr"
    ),
}
OPTIONAL_PHASES = ("tune", "refine")  # run only when their step count is not 0


def _phase_schedule(cfg: Config, phase: str) -> tuple[int, float, object]:
    """(steps, peak LR, LR lambda) of a phase."""
    spec = PHASES[phase]
    steps, lr = getattr(cfg, spec.steps_field), getattr(cfg, spec.lr_field)
    if phase == "eps":  # a cosine laid out over more steps than it runs (see Config)
        return steps, lr, _lr_lambda(cfg.unet_schedule_steps)
    return steps, lr, _lr_lambda(steps, warmup=50)


def token_identity_loss(head: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Cross-entropy of each real token's id read back linearly from its final text state.

    Keeps every caption word distinguishable at the text encoder's output (the UNet can only
    learn to use what it can tell apart); the head is thrown away at export.
    """
    mask = ids != pad_id
    return F.cross_entropy(head(hidden[mask]), ids[mask])


def train_unet(
    cfg: Config, vae, tok, captions: list[str], images: np.ndarray, ckpt: Path, log: LossLog, preview, phase: str = "eps"
):
    """Stage 2: text encoder and UNet together on frozen-VAE latents, with caption dropout.

    phase "eps" starts from random weights; every other phase continues from the raw
    (non-EMA) weights where its source phase stopped, with a fresh optimizer, LR schedule
    and EMA.
    """
    from tqdm import tqdm

    spec = PHASES[phase]
    steps, lr, schedule = _phase_schedule(cfg, phase)
    mean, std, scaling = _cached_latents(vae, images, ckpt)
    vae.register_to_config(scaling_factor=scaling)
    ids = tokenize(tok, captions)
    empty = tokenize(tok, [""])[0]
    torch.manual_seed(cfg.seed + 1)
    text_encoder, unet = make_text_encoder(tok), make_unet()
    if spec.source is not None:
        states = _ckpt_states(ckpt / PHASES[spec.source].folder)
        text_encoder.load_state_dict(states["text_encoder"])
        unet.load_state_dict(states["unet"])
    noise_sched = make_noise_scheduler(spec.prediction)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    ema_te, ema_unet = EMA(text_encoder, cfg.ema_decay), EMA(unet, cfg.ema_decay)
    modules = {"text_encoder": text_encoder, "unet": unet, "ema_text_encoder": ema_te, "ema_unet": ema_unet}
    if spec.token_loss:
        head = torch.nn.Linear(text_encoder.config.hidden_size, len(tok))
        params += list(head.parameters())
        modules["token_head"] = head
    folder = ckpt / spec.folder
    opt, sched, start = resumable_optimizer(params, lr, 0.01, schedule, folder, modules)
    name = spec.name
    elapsed = _stage_seconds(ckpt, name)
    t0 = time.time()
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps, mininterval=30)
    for step in bar:
        g = _step_generator(cfg.seed, spec.stage_id, step)
        idx = torch.randint(0, len(mean), (cfg.unet_batch,), generator=g)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.cfg_dropout
        tokens = torch.where(drop[:, None], empty[None], ids[idx])
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        hidden = text_encoder(tokens)[0]
        pred = unet(noise_sched.add_noise(latents, noise, t), t, hidden).sample
        target = noise if spec.prediction == "epsilon" else noise_sched.get_velocity(latents, noise, t)
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if spec.weighting == "min_snr":
            per_sample = per_sample * _snr_weights(noise_sched, t, cfg.min_snr_gamma)
        loss = per_sample.mean()
        if spec.token_loss:
            loss = loss + cfg.token_loss_weight * token_identity_loss(head, hidden, tokens, tok.pad_token_id)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_te.update(text_encoder, step)
        ema_unet.update(unet, step)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % 10 == 0:
            log.write(name, step, loss.item(), sched.get_last_lr()[0], elapsed + time.time() - t0)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
            _save_ckpt(folder, step + 1, modules, opt)
            _record_stage(ckpt, name, elapsed + time.time() - t0)
        if (step + 1) % cfg.preview_every == 0 and preview is not None:
            preview(step + 1, phase)
    return ema_te, ema_unet


# ---------------------------------------------------------------- stage 3: decoder fine-tune


def train_decoder(cfg: Config, vae, images: np.ndarray, ckpt: Path, log: LossLog):
    """Stage 3: fine-tune only the decoder on whole 64x64 images (as SD's ft-MSE VAE did).

    The encoder stays frozen, so the latent space the UNet learned is unchanged; the crops
    of stage 1 never showed the decoder a full frame, and this sharpens colours and borders.
    """
    from tqdm import tqdm

    mean, std, _ = _cached_latents(vae, images, ckpt)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    folder = ckpt / "decoder_ckpt"
    schedule = _lr_lambda(cfg.decoder_steps, warmup=50)
    opt, sched, start = resumable_optimizer(params, cfg.decoder_lr, 0.0, schedule, folder, {"vae": vae})
    elapsed = _stage_seconds(ckpt, "decoder")
    t0 = time.time()
    vae.train()
    bar = tqdm(range(start, cfg.decoder_steps), desc="decoder", initial=start, total=cfg.decoder_steps, mininterval=30)
    for step in bar:
        g = _step_generator(cfg.seed, 3, step)
        idx = torch.randint(0, len(images), (cfg.decoder_batch,), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        x = _pixels(images[idx.numpy()])
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % 10 == 0:
            log.write("decoder", step, loss.item(), sched.get_last_lr()[0], elapsed + time.time() - t0)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.decoder_steps:
            _save_ckpt(folder, step + 1, {"vae": vae}, opt)
            _record_stage(ckpt, "decoder", elapsed + time.time() - t0)
    vae.requires_grad_(False)
    return vae.eval()


# ---------------------------------------------------------------- export


def inference_scheduler(prediction_type: str = "v_prediction"):
    """DPM++ 2M (DPMSolverMultistep) on the training betas and prediction type."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(make_noise_scheduler(prediction_type).config)


def export(out: Path, vae, tok, te_state: dict, unet_state: dict, fp16: bool, prediction_type: str = "v_prediction") -> None:
    """Write the standard diffusers Stable Diffusion folder (safetensors, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    text_encoder, unet = make_text_encoder(tok), make_unet()
    text_encoder.load_state_dict(te_state)
    unet.load_state_dict(unet_state)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=inference_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if fp16:
        # diffusers upcasts fp16 files to the requested dtype (fp32 by default), but
        # transformers loads a text encoder in its stored dtype: keep that one fp32 (0.4 MB)
        # so a plain from_pretrained() gives one dtype throughout.
        unet.half()
        vae.half()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    vae.float()
    # The fast tokenizer saves only tokenizer.json; keep CLIP's vocab.json/merges.txt too.
    for name in ("vocab.json", "merges.txt"):
        src = Path(tok.name_or_path) / name
        if src.exists():
            shutil.copy2(src, tmp / "tokenizer" / name)
    for extra in ("sdbatch.json", "README.md", "training.json", "loss_log.csv", "evaluation.json", "samples.png", "samples.txt"):
        if (out / extra).exists():  # keep files written after training (defaults, card, eval)
            shutil.copy2(out / extra, tmp / extra)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def write_defaults(out: Path, steps: int = 20, guidance: float = 5.0, sampler: str = "DPM++ 2M") -> None:
    """model/sdbatch.json: the defaults sdbatch uses when a job names this model."""
    defaults = {"width": scenes.SIZE, "height": scenes.SIZE, "steps": steps, "guidance": guidance, "sampler": sampler}
    (out / "sdbatch.json").write_text(json.dumps(defaults, indent=2) + "\n")


def preview_grid(model_dir: Path, path: Path, steps: int = 20, guidance: float = 5.0) -> None:
    """Render 16 fixed prompts with the exported pipeline into one PNG (eyeball progress)."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(123)
    prompts = [scenes.single_caption(**scenes.sample_single_attributes(rng)) for _ in range(16)]
    gens = [torch.Generator().manual_seed(i) for i in range(16)]
    imgs = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, height=64, width=64, output_type="np").images
    grid = (np.concatenate([np.concatenate(list(imgs[r * 4 : r * 4 + 4]), 1) for r in range(4)], 0) * 255).round().astype(np.uint8)
    Image.fromarray(grid).resize((512, 512), Image.Resampling.NEAREST).save(path)
    path.with_suffix(".txt").write_text("\n".join(prompts) + "\n")


# ---------------------------------------------------------------- bookkeeping


def machine() -> str:
    """CPU model, cores and threads used: the 'on what machine' of the training record."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, {platform.system()}"


def _stage_seconds(ckpt: Path, stage: str) -> float:
    """Seconds already spent on a stage by earlier (interrupted) runs."""
    path = ckpt / "timing.json"
    return json.loads(path.read_text()).get(stage, 0.0) if path.exists() else 0.0


def _record_stage(ckpt: Path, stage: str, seconds: float) -> None:
    path = ckpt / "timing.json"
    timing = json.loads(path.read_text()) if path.exists() else {}
    timing[stage] = round(seconds, 1)
    path.write_text(json.dumps(timing, indent=2))


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: run (or resume) both stages, then export the model folder."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("model"))
    parser.add_argument("--ckpt", type=Path, default=Path(".cache/sdbatch-tiny"), help="checkpoints, data, logs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: leave a core free)")
    parser.add_argument("--fp32", action="store_true", help="export float32 weights instead of float16")
    parser.add_argument("--export-only", action="store_true", help="export from the latest checkpoints and stop")
    for name, value in vars(Config()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = Config(**{k: getattr(args, k) for k in vars(Config())})
    torch.set_num_threads(args.threads)
    args.ckpt.mkdir(parents=True, exist_ok=True)
    (args.ckpt / "config.json").write_text(json.dumps(vars(cfg), indent=2))
    log = LossLog(args.ckpt / "loss_log.csv")

    t_data = time.time()
    images, captions = scenes.render_dataset(cfg.n_scenes, seed=cfg.seed)
    tok = build_tokenizer(args.ckpt / "tokenizer")
    print(f"dataset: {len(images)} scenes in {time.time() - t_data:.0f}s; machine: {machine()}", flush=True)

    if args.export_only:  # every stage stops where its checkpoint is
        for field, steps in _steps_done(args.ckpt).items():
            setattr(cfg, field, steps)
    vae = train_vae(cfg, images, args.ckpt, log)
    vae.requires_grad_(False)

    def preview(step: int, phase: str) -> None:
        tmp = args.ckpt / "preview_model"
        spec = PHASES[phase]
        states = _ckpt_states(args.ckpt / spec.folder)
        export(tmp, vae, tok, states["ema_text_encoder"], states["ema_unet"], fp16=False, prediction_type=spec.prediction)
        preview_grid(tmp, args.ckpt / f"preview_{phase}_{step:05d}.png")

    train_unet(cfg, vae, tok, captions, images, args.ckpt, log, preview, phase="eps")
    ema_te, ema_unet = train_unet(cfg, vae, tok, captions, images, args.ckpt, log, preview, phase="v")
    for phase in OPTIONAL_PHASES:
        if getattr(cfg, PHASES[phase].steps_field):
            ema_te, ema_unet = train_unet(cfg, vae, tok, captions, images, args.ckpt, log, preview, phase=phase)
    vae = train_decoder(cfg, vae, images, args.ckpt, log)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_training_record(args, cfg)
    export(args.out, vae, tok, ema_te.state_dict(), ema_unet.state_dict(), fp16=not args.fp32)
    if not (args.out / "sdbatch.json").exists():
        write_defaults(args.out)
    print(f"exported {args.out}", flush=True)


# Config field with a stage's step count -> that stage's checkpoint folder.
STAGE_CKPTS = {
    "vae_steps": "vae_ckpt",
    **{spec.steps_field: spec.folder for spec in PHASES.values()},
    "decoder_steps": "decoder_ckpt",
}


def _steps_done(ckpt: Path) -> dict[str, int]:
    """Steps each stage's checkpoint was saved at (0 for a stage not started)."""
    done = {}
    for field, folder in STAGE_CKPTS.items():
        step_file = ckpt / folder / "step.json"
        done[field] = json.loads(step_file.read_text())["step"] if step_file.exists() else 0
    return done


def _ckpt_states(folder: Path) -> dict[str, dict]:
    """All weight files of a checkpoint, by module name."""
    from safetensors.torch import load_file

    return {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors")}


def _write_training_record(args, cfg: Config) -> None:
    """model/training.json and model/loss_log.csv: how long, on what, with which settings."""
    timing = json.loads((args.ckpt / "timing.json").read_text())
    record = {
        "command": "python -m sdbatch.tiny.train --out sdbatch/tiny/model",
        "config": vars(cfg),
        "seconds": timing,
        "machine": machine(),
        **{f"{field}_done": steps for field, steps in _steps_done(args.ckpt).items()},
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.copy2(args.ckpt / "loss_log.csv", args.out / "loss_log.csv")


if __name__ == "__main__":
    main()
