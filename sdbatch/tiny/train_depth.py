"""Train sdbatch-tiny-depth: a small DPT depth estimator (MiDaS's architecture) for the scenes.

    python -m sdbatch.tiny.train_depth      # -> sdbatch/tiny/depth-estimator

The depth conditioner runs real DPT models through transformers (``Intel/dpt-hybrid-midas``
by hub id on a connected machine). Offline, a random DPT would make every depth claim
vacuous, so this trains one in transformers' own format on the procedural scenes'
ground-truth depth (background far, the front shape nearest), as inverse depth (near =
large) like MiDaS predicts. Plain MSE: MiDaS's scale- and shift-invariant loss exists to
mix datasets of unknown scale; here (one consistent ground truth) it let a first attempt
learn depth upside down and slowed learning. Weighted towards shape pixels. Fixed seeds, a progress bar and a loss log;
minutes on one CPU core.
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

from sdbatch.tiny import depth_estimator_path, scenes
from sdbatch.tiny.train import LossLog, _lr_lambda, _step_generator, machine

STAGE_ID = 13  # per-step generator stream (train.py uses 1-6, train_controlnet.py 11-12)


@dataclass
class DepthConfig:
    seed: int = 1  # scenes from another seed than the image model's training set
    n_scenes: int = 12000
    steps: int = 1500
    batch: int = 16
    lr: float = 1e-3


def make_dpt():
    """A small plain-ViT DPT for 64x64 inputs (patch 8: an 8x8 token grid)."""
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                       image_size=scenes.SIZE, patch_size=8, is_hybrid=False, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=32, use_auxiliary_head=False)
    return DPTForDepthEstimation(config)


def train(cfg: DepthConfig, out: Path) -> dict:
    from tqdm import tqdm

    from sdbatch_plugins.preprocessors import _default_dpt_processor

    t0 = time.time()
    # Two shapes apart carry no visible order (the ground truth's is the drawing order, a coin
    # flip to the eye): train on one-shape scenes and overlapping pairs, where occlusion shows it.
    data = [s for s in (scenes.make_scene(cfg.seed * 1_000_000 + i) for i in range(cfg.n_scenes))
            if len(s.attributes.shapes) == 1 or s.attributes.overlap]
    pixels = torch.from_numpy(np.stack([s.image for s in data])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    depth = torch.from_numpy(np.stack([s.depth for s in data])).float().div(255)
    # Shapes are a small part of each image; weight their pixels up so the order of two
    # shapes, not the flat background, dominates the loss.
    weight = 1.0 + 4.0 * torch.from_numpy(np.stack([s.labels > 0 for s in data])).float()
    torch.manual_seed(cfg.seed + STAGE_ID)
    model = make_dpt().train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.steps, warmup=50))
    log_dir = Path(".cache/sdbatch-tiny-depth")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = LossLog(log_dir / "loss_log.csv")
    for step in tqdm(range(cfg.steps), desc="depth", mininterval=30):
        g = _step_generator(cfg.seed, STAGE_ID, step)
        idx = torch.randint(0, len(data), (cfg.batch,), generator=g)
        flip = torch.rand(cfg.batch, generator=g) < 0.5  # depth order does not care about left and right
        x, y, w = pixels[idx], depth[idx], weight[idx]
        x[flip], y[flip], w[flip] = x[flip].flip(-1), y[flip].flip(-1), w[flip].flip(-1)
        pred = model(pixel_values=x).predicted_depth  # DPT's head upsamples past the input size
        pred = torch.nn.functional.interpolate(pred[:, None], size=y.shape[-2:], mode="area")[:, 0]
        loss = (w * (pred - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0:
            log.write("depth", step, loss.item(), sched.get_last_lr()[0], time.time() - t0)
    seconds = round(time.time() - t0, 1)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(str(tmp))
    _default_dpt_processor(model.config).save_pretrained(str(tmp))
    record = {"command": "python -m sdbatch.tiny.train_depth", "config": asdict(cfg), "seconds": seconds,
              "machine": machine()}
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.copy2(log_dir / "loss_log.csv", tmp / "loss_log.csv")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return record


def order_accuracy(folder: Path, n: int = 200, seed: int = 7) -> float:
    """Fraction of held-out scenes of two overlapping shapes whose estimated depth puts the front one nearer.

    Only overlapping pairs: there occlusion shows which shape is in front; for two apart,
    the ground truth's order (drawing order) is not visible in the image at all.
    """
    from sdbatch_plugins.preprocessors import depth_map, load_depth_estimator

    estimator = load_depth_estimator(str(folder))
    right = total = 0
    i = 0
    while total < n:
        scene = scenes.make_scene(seed * 1_000_000 + i)
        i += 1
        if not scene.attributes.overlap or not (scene.labels == 1).any():
            continue
        right += scenes.depth_orders_front(depth_map(estimator, scene.pil()), scene)
        total += 1
    return right / total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=depth_estimator_path())
    parser.add_argument("--threads", type=int, default=1)
    for name, value in asdict(DepthConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = DepthConfig(**{k: getattr(args, k) for k in asdict(DepthConfig())})
    record = train(cfg, args.out)
    accuracy = order_accuracy(args.out)
    record["front_nearer_accuracy_200_overlapping_scenes"] = accuracy
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"trained in {record['seconds']}s; front shape nearer in {accuracy:.1%} of 200 held-out overlapping pairs", flush=True)


if __name__ == "__main__":
    main()
