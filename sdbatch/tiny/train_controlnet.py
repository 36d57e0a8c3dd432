"""Train a ControlNet for sdbatch-tiny on the procedural scenes' ground-truth maps.

    python -m sdbatch.tiny.train_controlnet --kind canny   # -> sdbatch/tiny/controlnet/canny
    python -m sdbatch.tiny.train_controlnet --kind depth   # -> sdbatch/tiny/controlnet/depth

As ControlNet was trained (Zhang et al. 2023): the net starts as a copy of the trained
U-Net's encoder with zero convolutions on its outputs; the base model (VAE, text encoder,
U-Net) stays frozen; the loss is plain v-prediction MSE over all timesteps (as ControlNet
and SD 2 train; min-SNR weighting would all but ignore the high-noise steps where a control
map must fix the layout), with 10% of captions dropped so control alone also steers. Maps: the scenes' exact edge
map (what Canny finds on these flat-colour renders) and depth map (background far, the
front shape nearest), as 3-channel images in 0..1. Fixed seeds, resumable checkpoints,
a progress bar and a loss log, as train.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdbatch.tiny import controlnet_path, model_path, scenes
from sdbatch.tiny.train import (LossLog, _cached_latents, _lr_lambda, _save_ckpt, _step_generator, machine,
                                resumable_optimizer, tokenize)

KINDS = ("canny", "depth")
# Stage ids for the per-step generators (train.py uses 1-6).
STAGE_IDS = {"canny": 11, "depth": 12}


@dataclass
class ControlConfig:
    """Everything that decides the result; written beside the checkpoints."""

    seed: int = 0
    n_scenes: int = 30_000
    steps: int = 1000
    batch: int = 32
    lr: float = 3e-4
    cfg_dropout: float = 0.1
    checkpoint_every: int = 100


def scene_maps(n: int, kind: str, seed: int = 0) -> np.ndarray:
    """The (n, H, W) uint8 map of every training scene (same scenes as train.py's dataset)."""
    maps = np.empty((n, scenes.SIZE, scenes.SIZE), np.uint8)
    for i in range(n):
        scene = scenes.make_scene(seed * 1_000_000 + i)
        maps[i] = scene.edges if kind == "canny" else scene.depth
    return maps


def _cached(path: Path, make):
    if path.exists():
        return np.load(path)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, value)
    return value


def load_base(model: Path):
    """The frozen base model's parts (float32, eval)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = {
        "vae": AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32),
        "unet": UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float32),
        "text_encoder": CLIPTextModel.from_pretrained(model / "text_encoder", torch_dtype=torch.float32),
        "tokenizer": CLIPTokenizer.from_pretrained(model / "tokenizer"),
        "noise": DDPMScheduler.from_pretrained(model / "scheduler"),
    }
    for name in ("vae", "unet", "text_encoder"):
        parts[name].eval().requires_grad_(False)
    return parts


def make_controlnet(unet, vae_factor: int):
    """A ControlNet copied from the U-Net, its map embedding downsampling by the VAE factor."""
    from diffusers import ControlNetModel

    downsamples = int(np.log2(vae_factor))
    channels = tuple(16 * 2**i for i in range(downsamples + 1))  # 16, 32, 64 for factor 4
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)


def base_fingerprint(model: Path) -> str:
    """sha256 (16 hex digits) of the base U-Net's weights: a ControlNet belongs to one base model."""
    digest = hashlib.sha256()
    for path in sorted((model / "unet").glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _check_resumable(ckpt: Path, base: str, settings: dict) -> None:
    """Refuse to resume a checkpoint of another base model or other settings (it would export stale weights)."""
    config = ckpt / "config.json"
    if not ((ckpt / "ckpt" / "step.json").exists() and config.exists()):
        return
    saved = json.loads(config.read_text())
    old = saved.pop("base", None)
    saved.pop("kind", None)
    if old != base:
        why = f"trained against another base model ({old or 'unrecorded'}, now {base})"
    elif saved != settings:
        changed = sorted(k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k))
        why = f"trained with other settings ({', '.join(changed)})"
    else:
        return
    raise SystemExit(f"{ckpt} holds a ControlNet checkpoint {why}; delete that folder or pass another --ckpt")


def train(kind: str, cfg: ControlConfig, model: Path, ckpt: Path, out: Path) -> None:
    from tqdm import tqdm

    base_id = base_fingerprint(model)
    _check_resumable(ckpt, base_id, asdict(cfg))
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps({"kind": kind, "base": base_id, **asdict(cfg)}, indent=2))
    t_data = time.time()
    images, captions = scenes.render_dataset(cfg.n_scenes, seed=cfg.seed)
    maps = _cached(ckpt.parent / f"maps-{kind}-{cfg.seed}-{cfg.n_scenes}.npy",
                   lambda: scene_maps(cfg.n_scenes, kind, cfg.seed))
    base = load_base(model)
    vae, unet, text_encoder, tok, noise_sched = (base[k] for k in ("vae", "unet", "text_encoder", "tokenizer", "noise"))
    mean, std, _ = _cached_latents(vae, images, ckpt.parent)  # train.py's cache, shared when present
    scaling = vae.config.scaling_factor  # the shipped model's, as the base U-Net was trained with
    ids = tokenize(tok, captions)
    empty = tokenize(tok, [""])[0]
    print(f"data: {len(images)} scenes and {kind} maps in {time.time() - t_data:.0f}s; machine: {machine()}",
          flush=True)

    torch.manual_seed(cfg.seed + STAGE_IDS[kind])
    net = make_controlnet(unet, 2 ** (len(vae.config.block_out_channels) - 1)).train()
    schedule = _lr_lambda(cfg.steps, warmup=50)
    folder = ckpt / "ckpt"
    opt, sched, start = resumable_optimizer(net.parameters(), cfg.lr, 0.0, schedule, folder, {"controlnet": net})
    log = LossLog(ckpt / "loss_log.csv")
    elapsed = json.loads((ckpt / "timing.json").read_text())["seconds"] if (ckpt / "timing.json").exists() else 0.0
    t0 = time.time()
    for step in tqdm(range(start, cfg.steps), desc=f"controlnet-{kind}", initial=start, total=cfg.steps,
                     mininterval=30):
        g = _step_generator(cfg.seed, STAGE_IDS[kind], step)
        idx = torch.randint(0, len(mean), (cfg.batch,), generator=g)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        control = torch.from_numpy(maps[idx.numpy()]).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
        drop = torch.rand(cfg.batch, generator=g) < cfg.cfg_dropout
        tokens = torch.where(drop[:, None], empty[None], ids[idx])
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,), generator=g)
        noisy = noise_sched.add_noise(latents, noise, t)
        with torch.no_grad():
            text = text_encoder(tokens)[0]
        down, mid = net(noisy, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
        pred = unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        target = noise if noise_sched.config.prediction_type == "epsilon" else noise_sched.get_velocity(latents, noise, t)
        loss = F.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0:
            log.write(f"controlnet-{kind}", step, loss.item(), sched.get_last_lr()[0], elapsed + time.time() - t0)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_ckpt(folder, step + 1, {"controlnet": net}, opt)
            (ckpt / "timing.json").write_text(json.dumps({"seconds": round(elapsed + time.time() - t0, 1)}))
    export(net, out, kind, cfg, ckpt, base_id)


def export(net, out: Path, kind: str, cfg: ControlConfig, ckpt: Path, base_id: str) -> None:
    """A diffusers ControlNet folder (fp16 safetensors) and its training record."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net.eval().half().save_pretrained(str(tmp), safe_serialization=True)
    net.float()
    timing = json.loads((ckpt / "timing.json").read_text())
    record = {"command": f"python -m sdbatch.tiny.train_controlnet --kind {kind}", "kind": kind,
              "config": asdict(cfg), "base_unet_sha256": base_id, "seconds": timing["seconds"], "machine": machine()}
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.copy2(ckpt / "loss_log.csv", tmp / "loss_log.csv")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"exported {out}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--model", type=Path, default=model_path(), help="the base model (sdbatch-tiny)")
    parser.add_argument("--out", type=Path, help="default: sdbatch/tiny/controlnet/KIND")
    parser.add_argument("--ckpt", type=Path, help="default: .cache/sdbatch-tiny-controlnet/KIND")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: leave a core free)")
    for name, value in asdict(ControlConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = ControlConfig(**{k: getattr(args, k) for k in asdict(ControlConfig())})
    torch.set_num_threads(args.threads)
    out = args.out or controlnet_path(args.kind)
    ckpt = args.ckpt or Path(".cache/sdbatch-tiny-controlnet") / args.kind
    train(args.kind, cfg, args.model, ckpt, out)


if __name__ == "__main__":
    main()
