"""Train sdbatch-tiny-pose, a tiny ViTPose keypoint estimator, on the scene generator's stick figures.

    python -m sdbatch.tiny.train_pose            # -> sdbatch/tiny/pose-estimator

A transformers `VitPoseForPoseEstimation` (ViT backbone 64x64, 8x8 patches, 6 layers of
width 128, ViTPose's simple decoder: COCO-17 heatmaps at 32x32), trained from scratch with
plain heatmap MSE (Gaussian targets, sigma 1 heatmap pixel) on stick figures (scenes.make_figure)
whose keypoints are known exactly. Inputs go through transformers' own
VitPoseImageProcessor with the whole image as the person box, as
`sdbatch_plugins.preprocessors.pose_keypoints` calls it, so the `pose` conditioner runs
offline with `estimator: sdbatch-tiny-pose`. Fixed seeds, resumable checkpoints, a loss
log and a training record, as the other sdbatch.tiny trainers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdbatch.tiny import pose_estimator_path, scenes
from sdbatch.tiny.train import LossLog, _lr_lambda, _save_ckpt, _step_generator, machine, resumable_optimizer

STAGE_ID = 21
# COCO-17 keypoint k is BODY_18 keypoint COCO_FROM_BODY_18[k] (nose, eyes, ears, shoulders, ... ankles).
COCO_FROM_BODY_18 = (0, 15, 14, 17, 16, 5, 2, 6, 3, 7, 4, 11, 8, 12, 9, 13, 10)
# The processor's warp for a whole-image box: COCO box (0, 0, 64, 64) padded 1.25x -> 80 px mapped onto 64.
_PAD = 1.25


@dataclass
class PoseConfig:
    """Everything that decides the result; written beside the checkpoints."""

    seed: int = 0
    n_figures: int = 12_000
    steps: int = 2000
    batch: int = 64
    lr: float = 1e-3
    sigma: float = 1.0  # heatmap pixels (2.6 image pixels)
    checkpoint_every: int = 200


def make_model():
    """The tiny ViTPose (random weights) and its processor."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    from sdbatch_plugins.preprocessors import _COCO_17, _vitpose_processor_class

    backbone = VitPoseBackboneConfig(image_size=[scenes.SIZE, scenes.SIZE], patch_size=[8, 8], hidden_size=128,
                                     num_hidden_layers=6, num_attention_heads=4, mlp_ratio=2, out_indices=[6])
    config = VitPoseConfig(backbone_config=backbone, scale_factor=4, use_simple_decoder=True,
                           id2label=dict(enumerate(_COCO_17)), label2id={n: i for i, n in enumerate(_COCO_17)})
    processor = _vitpose_processor_class()(size={"height": scenes.SIZE, "width": scenes.SIZE})
    return VitPoseForPoseEstimation(config), processor


def heatmap_coords(keypoints: np.ndarray, size: int) -> np.ndarray:
    """Image pixel coordinates (..., 2) to those of a ``size`` heatmap, for a whole-image box (the processor's warp)."""
    side = scenes.SIZE * _PAD
    return (keypoints - scenes.SIZE / 2 + side / 2) * (size - 1) / side


def figure_data(n: int, processor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Processed pixels (n, 3, 64, 64), COCO-17 image coordinates (n, 17, 2) and visibility (n, 17)."""
    pixels, coords, visible = [], [], []
    box = [[0.0, 0.0, float(scenes.SIZE), float(scenes.SIZE)]]
    for start in range(0, n, 500):
        figures = [scenes.make_figure(seed * 1_000_000 + i) for i in range(start, min(n, start + 500))]
        inputs = processor(images=[f.pil() for f in figures], boxes=[box] * len(figures), return_tensors="pt")
        pixels.append(inputs["pixel_values"].float())
        kp = np.stack([f.keypoints[list(COCO_FROM_BODY_18)] for f in figures])
        coords.append(torch.from_numpy(kp[..., :2]).float())
        visible.append(torch.from_numpy(kp[..., 2]).float())
    return torch.cat(pixels), torch.cat(coords), torch.cat(visible)


def gaussian_heatmaps(coords: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """(n, k, size, size) Gaussians centred on coords (n, k, 2: x, y)."""
    grid = torch.arange(size, dtype=torch.float32)
    dx = (grid[None, None, None, :] - coords[..., 0, None, None]) ** 2
    dy = (grid[None, None, :, None] - coords[..., 1, None, None]) ** 2
    return torch.exp(-(dx + dy) / (2 * sigma**2))


def train(cfg: PoseConfig, ckpt: Path, out: Path) -> None:
    from tqdm import tqdm

    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed + STAGE_ID)
    model, processor = make_model()
    t_data = time.time()
    cache = ckpt / f"figures-{cfg.seed}-{cfg.n_figures}.safetensors"  # tensors only: nothing runs when it loads
    if cache.exists():
        data = load_file(str(cache))
        pixels, coords, visible = data["pixels"], data["coords"], data["visible"]
    else:
        pixels, coords, visible = figure_data(cfg.n_figures, processor, cfg.seed)
        save_file({"pixels": pixels, "coords": coords, "visible": visible}, str(cache))
    print(f"data: {len(pixels)} figures in {time.time() - t_data:.0f}s; machine: {machine()}", flush=True)
    model.train()
    folder = ckpt / "ckpt"
    opt, sched, start = resumable_optimizer(model.parameters(), cfg.lr, 0.01, _lr_lambda(cfg.steps, warmup=100),
                                            folder, {"model": model})
    log = LossLog(ckpt / "loss_log.csv")
    elapsed = json.loads((ckpt / "timing.json").read_text())["seconds"] if (ckpt / "timing.json").exists() else 0.0
    t0 = time.time()
    for step in tqdm(range(start, cfg.steps), desc="pose-estimator", initial=start, total=cfg.steps, mininterval=30):
        g = _step_generator(cfg.seed, STAGE_ID, step)
        idx = torch.randint(0, len(pixels), (cfg.batch,), generator=g)
        heatmaps = model(pixel_values=pixels[idx]).heatmaps
        size = heatmaps.shape[-1]
        target = gaussian_heatmaps(torch.from_numpy(heatmap_coords(coords[idx].numpy(), size)), size, cfg.sigma)
        weight = visible[idx][..., None, None]
        loss = ((heatmaps - target) ** 2 * weight).mean() * 100  # x100: the usual heatmap-loss scale
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0:
            log.write("pose-estimator", step, loss.item(), sched.get_last_lr()[0], elapsed + time.time() - t0)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_ckpt(folder, step + 1, {"model": model}, opt)
            (ckpt / "timing.json").write_text(json.dumps({"seconds": round(elapsed + time.time() - t0, 1)}))
    export(model.eval(), processor, cfg, ckpt, out)


def export(model, processor, cfg: PoseConfig, ckpt: Path, out: Path) -> None:
    """A transformers folder (fp16 safetensors, the processor config) and its training record."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.half().save_pretrained(str(tmp), safe_serialization=True)
    model.float()
    processor.save_pretrained(str(tmp))
    timing = json.loads((ckpt / "timing.json").read_text())
    record = {"command": "python -m sdbatch.tiny.train_pose", "config": asdict(cfg), "seconds": timing["seconds"],
              "machine": machine(), "evaluation": evaluate(str(tmp))}
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.copy2(ckpt / "loss_log.csv", tmp / "loss_log.csv")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(json.dumps(record["evaluation"]), flush=True)
    print(f"exported {out}", flush=True)


def evaluate(folder: str, n: int = 100) -> dict:
    """Keypoint error on held-out figures through the pose preprocessor (pose_keypoints), BODY_18 order."""
    from sdbatch_plugins.preprocessors import load_pose_estimator, pose_keypoints

    estimator = load_pose_estimator(folder)
    errors = []
    for i in range(n):
        figure = scenes.make_figure(9_000_000 + i)  # the ControlNet evaluation's held-out figures
        found = pose_keypoints(estimator, figure.pil(), threshold=0.0)[0]
        errors.append(np.linalg.norm(found[:, :2] - figure.keypoints[:, :2], axis=1))
    errors = np.array(errors)
    return {"n": n, "mean keypoint error px": round(float(errors.mean()), 2),
            "keypoints within 2 px": round(float((errors <= 2).mean()), 3),
            "keypoints within 4 px": round(float((errors <= 4).mean()), 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="default: sdbatch/tiny/pose-estimator")
    parser.add_argument("--ckpt", type=Path, default=Path(".cache/sdbatch-tiny-pose"))
    parser.add_argument("--threads", type=int, default=1)
    for name, value in asdict(PoseConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = PoseConfig(**{k: getattr(args, k) for k in asdict(PoseConfig())})
    train(cfg, args.ckpt, args.out or pose_estimator_path())


if __name__ == "__main__":
    main()
