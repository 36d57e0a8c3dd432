"""Train a ControlNet for sdbatch-tiny on the procedural scenes' ground-truth maps.

    python -m sdbatch.tiny.train_controlnet --kind canny   # -> sdbatch/tiny/controlnet/canny
    python -m sdbatch.tiny.train_controlnet --kind depth   # -> sdbatch/tiny/controlnet/depth
    python -m sdbatch.tiny.train_controlnet --kind pose    # -> sdbatch/tiny/controlnet/pose
    python -m sdbatch.tiny.train_controlnet --kind canny --grad-check   # -> controlnet/grad_check.json

As ControlNet was trained (Zhang et al. 2023): the net starts as a copy of the trained
U-Net's encoder with zero convolutions on its outputs; the base model (VAE, text encoder,
U-Net) stays frozen; the loss is plain v-prediction MSE over all timesteps (as ControlNet
and SD 2 train; min-SNR weighting would all but ignore the high-noise steps where a control
map must fix the layout). Captions are layout-free by default (`--captions layout-free`:
position phrases removed, "in front of" read as "and", see scenes.layout_free_caption) and
25% are dropped: sdbatch-tiny follows position words, so with full captions the text
already fixes the layout a control map would add and the net has little left to learn.
Maps: the scenes' exact edge map (what Canny finds on these flat-colour renders) and depth
map (background far, the front shape nearest), as 3-channel images in 0..1; for pose,
stick figures (scenes.make_figure) and their OpenPose skeleton maps (sdbatch.pose), which
sdbatch-tiny never saw. Fixed seeds, resumable checkpoints, a progress bar and a loss log,
as train.py.
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

KINDS = ("canny", "depth", "pose")
# Stage ids for the per-step generators (train.py uses 1-6).
STAGE_IDS = {"canny": 11, "depth": 12, "pose": 13}
CAPTIONS = ("layout-free", "full")


@dataclass
class ControlConfig:
    """Everything that decides the result; written beside the checkpoints."""

    seed: int = 0
    n_scenes: int = 30_000
    steps: int = 1000
    batch: int = 32
    lr: float = 3e-4
    cfg_dropout: float = 0.25
    captions: str = "layout-free"  # or "full": the scenes' own captions (the first release)
    checkpoint_every: int = 100


def scene_maps(n: int, kind: str, seed: int = 0) -> np.ndarray:
    """The (n, H, W) uint8 map of every training scene (same scenes as train.py's dataset)."""
    maps = np.empty((n, scenes.SIZE, scenes.SIZE), np.uint8)
    for i in range(n):
        scene = scenes.make_scene(seed * 1_000_000 + i)
        maps[i] = scene.edges if kind == "canny" else scene.depth
    return maps


def scene_captions(n: int, mode: str, seed: int = 0) -> list[str]:
    """The training scenes' captions, as written (``full``) or without their layout (``layout-free``)."""
    if mode not in CAPTIONS:
        raise ValueError(f"unknown caption mode {mode!r}; expected one of {CAPTIONS}")
    found = []
    for i in range(n):
        scene = scenes.make_scene(seed * 1_000_000 + i)
        found.append(scene.caption if mode == "full" else scenes.layout_free_caption(scene.attributes))
    return found


def figure_data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n stick figures (scenes.make_figure, seed*1e6+i): images (n, H, W, 3), pose maps (n, H, W, 3), captions."""
    images = np.empty((n, scenes.SIZE, scenes.SIZE, 3), np.uint8)
    maps = np.empty((n, scenes.SIZE, scenes.SIZE, 3), np.uint8)
    captions = []
    for i in range(n):
        figure = scenes.make_figure(seed * 1_000_000 + i)
        images[i], maps[i] = figure.image, figure.pose_map
        captions.append(figure.caption)
    return {"images": images, "maps": maps, "captions": np.array(captions)}


def training_data(kind: str, cfg: ControlConfig, cache: Path) -> tuple[np.ndarray, list[str], np.ndarray, Path]:
    """Images, captions, control maps and the latent cache folder of one ControlNet's training set."""
    if kind == "pose":
        path = cache / f"figures-{cfg.seed}-{cfg.n_scenes}.npz"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **figure_data(cfg.n_scenes, cfg.seed))
        data = np.load(path)
        folder = cache / f"figures-{cfg.seed}-{cfg.n_scenes}"
        folder.mkdir(parents=True, exist_ok=True)
        return data["images"], [str(c) for c in data["captions"]], data["maps"], folder
    images, captions = scenes.render_dataset(cfg.n_scenes, seed=cfg.seed)
    if cfg.captions != "full":
        captions = scene_captions(cfg.n_scenes, cfg.captions, cfg.seed)
    maps = _cached(cache / f"maps-{kind}-{cfg.seed}-{cfg.n_scenes}.npy",
                   lambda: scene_maps(cfg.n_scenes, kind, cfg.seed))
    return images, captions, maps, cache


def control_tensor(maps: np.ndarray) -> torch.Tensor:
    """uint8 maps, (n, H, W) or (n, H, W, 3), as the ControlNet's (n, 3, H, W) input in 0..1."""
    x = torch.from_numpy(np.ascontiguousarray(maps)).float().div(255)
    return x.unsqueeze(1).repeat(1, 3, 1, 1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


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
    images, captions, maps, latent_cache = training_data(kind, cfg, ckpt.parent)
    base = load_base(model)
    vae, unet, text_encoder, tok, noise_sched = (base[k] for k in ("vae", "unet", "text_encoder", "tokenizer", "noise"))
    mean, std, _ = _cached_latents(vae, images, latent_cache)  # train.py's cache, shared when present
    scaling = vae.config.scaling_factor  # the shipped model's, as the base U-Net was trained with
    ids = tokenize(tok, captions)
    empty = tokenize(tok, [""])[0]
    what = "stick figures" if kind == "pose" else "scenes"
    print(f"data: {len(images)} {what} and {kind} maps in {time.time() - t_data:.0f}s; machine: {machine()}",
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
        control = control_tensor(maps[idx.numpy()])
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


def gradient_check(kind: str, model: Path, batches: int = 4, batch: int = 32, seed: int = 0) -> dict:
    """How much a control map could still teach, per caption mode, at the start of training.

    For a fresh net (zero convolutions: residuals are 0, so the base predicts alone) on the
    same noisy latents: the v-MSE loss, the norm of its gradient at the residuals the net adds
    (per sample, over all 4 down/mid residual blocks), and at the zero convolutions' weights.
    A caption that already fixes the layout leaves the base little error the map can
    explain, so these shrink; they are compared for full, layout-free and empty captions.
    """
    base = load_base(model)
    vae, unet, text_encoder, tok, noise_sched = (base[k] for k in ("vae", "unet", "text_encoder", "tokenizer", "noise"))
    torch.manual_seed(seed + STAGE_IDS[kind])
    net = make_controlnet(unet, 2 ** (len(vae.config.block_out_channels) - 1))
    zero_convs = [p for n, p in net.named_parameters()
                  if n.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    n = batches * batch
    if kind == "pose":
        data = figure_data(n, seed=8)
        images, maps, modes = data["images"], data["maps"], {"full": [str(c) for c in data["captions"]]}
    else:
        found = [scenes.make_scene(8_000_000 + i) for i in range(n)]  # scenes no net was trained on
        images = np.stack([s.image for s in found])
        maps = np.stack([s.edges if kind == "canny" else s.depth for s in found])
        modes = {"full": [s.caption for s in found],
                 "layout-free": [scenes.layout_free_caption(s.attributes) for s in found]}
    modes["empty"] = [""] * n
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        from sdbatch.tiny.train import _pixels
        latents = vae.encode(_pixels(images)).latent_dist.mean * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (n,), generator=g)
    noisy = noise_sched.add_noise(latents, noise, t)
    target = noise_sched.get_velocity(latents, noise, t)
    report = {"kind": kind, "samples": n, "base_unet_sha256": base_fingerprint(model)}
    for mode, captions in modes.items():
        losses, residual_norms, weight_norms = [], [], []
        for i in range(0, n, batch):
            sl = slice(i, i + batch)
            with torch.no_grad():
                text = text_encoder(tokenize(tok, captions[sl]))[0]
            net.zero_grad()
            down, mid = net(noisy[sl], t[sl], encoder_hidden_states=text, controlnet_cond=control_tensor(maps[sl]),
                            return_dict=False)
            for r in [*down, mid]:
                r.retain_grad()
            pred = unet(noisy[sl], t[sl], encoder_hidden_states=text, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
            loss = F.mse_loss(pred, target[sl])
            loss.backward()
            losses.append(loss.item())
            per_sample = sum(r.grad.pow(2).flatten(1).sum(1) for r in [*down, mid]).sqrt() * batch
            residual_norms.append(per_sample.mean().item())
            weight_norms.append(torch.cat([p.grad.flatten() for p in zero_convs]).norm().item())
        report[mode] = {"loss": round(float(np.mean(losses)), 4),
                        "residual_grad_norm_per_sample": round(float(np.mean(residual_norms)), 4),
                        "zero_conv_weight_grad_norm": round(float(np.mean(weight_norms)), 4)}
    return report


def export(net, out: Path, kind: str, cfg: ControlConfig, ckpt: Path, base_id: str) -> None:
    """A diffusers ControlNet folder (fp16 safetensors) and its training record."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net.eval().half().save_pretrained(str(tmp), safe_serialization=True)
    net.float()
    timing = json.loads((ckpt / "timing.json").read_text())
    record = {"command": f"python -m sdbatch.tiny.train_controlnet --kind {kind}", "kind": kind,
              "training_data": "stick figures (scenes.make_figure) and their pose maps" if kind == "pose"
              else f"scenes with {cfg.captions} captions and their {kind} maps",
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
    parser.add_argument("--grad-check", action="store_true",
                        help="measure the loss's gradient at the residuals of a fresh net (no training)")
    for name, value in asdict(ControlConfig()).items():
        kwargs = {"choices": CAPTIONS} if name == "captions" else {}
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, **kwargs)
    args = parser.parse_args(argv)
    cfg = ControlConfig(**{k: getattr(args, k) for k in asdict(ControlConfig())})
    torch.set_num_threads(args.threads)
    out = args.out or controlnet_path(args.kind)
    ckpt = args.ckpt or Path(".cache/sdbatch-tiny-controlnet") / args.kind
    if args.grad_check:
        report = gradient_check(args.kind, args.model)
        print(json.dumps(report, indent=2))
        path = controlnet_path(args.kind).parent / "grad_check.json"  # one record, a key per kind
        record = json.loads(path.read_text()) if path.exists() else {}
        record[args.kind] = report
        path.write_text(json.dumps(dict(sorted(record.items())), indent=2) + "\n")
        return
    train(args.kind, cfg, args.model, ckpt, out)


if __name__ == "__main__":
    main()
