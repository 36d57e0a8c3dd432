"""A small CNN that reads a one-shape scene's attributes back from its pixels.

Trained only on the procedural ground truth (sdbatch.tiny.scenes), it scores generated
images for prompt adherence: did "a small red circle on the left, on a blue background"
come out red, a circle, on the left, on blue?

    python -m sdbatch.tiny.classifier --steps 1500          # train, save weights, report accuracy

Weights ship beside this file (classifier.safetensors) so evaluation and tests never retrain.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sdbatch.tiny import scenes

WEIGHTS = Path(__file__).with_name("classifier.safetensors")
# Each head predicts one attribute; the order of its classes is the order here.
HEADS: dict[str, tuple[str, ...]] = {
    "colour": tuple(scenes.COLOURS),
    "shape": scenes.SHAPES,
    "position": scenes.POSITIONS,
    "size": scenes.SIZES,
    "background": tuple(scenes.COLOURS),
}
# Held-out scenes use seeds from here on; training never reaches them.
HELD_OUT_SEED = 10_000_000


class SceneClassifier(nn.Module):
    """Four stride-2 conv layers, then one linear head per attribute."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans, chans[1:]))
        # Flattening the 4x4 map (not pooling it) keeps where things are: position needs that.
        self.fc = nn.Linear(chans[-1] * 16, 256)
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, 64, 64) in [-1, 1]; returns logits per attribute."""
        for conv in self.convs:
            x = F.silu(conv(x))
        h = F.silu(self.fc(x.flatten(1)))
        return {k: head(h) for k, head in self.heads.items()}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def single_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """n random one-shape, plain-background scenes and their label indices."""
    images = np.empty((n, scenes.SIZE, scenes.SIZE, 3), np.uint8)
    labels = {k: np.empty(n, np.int64) for k in HEADS}
    for i in range(n):
        attrs = scenes.sample_single_attributes(rng)
        scene = scenes.make_single(**attrs, seed=int(rng.integers(2**31)))
        images[i] = scene.image
        for k, classes in HEADS.items():
            labels[k][i] = classes.index(attrs[k])
    return images, labels


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and a slight colour cast: generated images are softer than renders."""
    b = x.shape[0]
    sigma = torch.rand(b, 1, 1, 1, generator=g) * 1.2
    kernel = torch.tensor([0.25, 0.5, 0.25])
    k2 = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    mix = (sigma / 1.2).clamp(0, 1)
    x = x * (1 - mix) + blurred * mix
    x = x + torch.randn(x.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 0.15
    x = x + (torch.rand(b, 3, 1, 1, generator=g) - 0.5) * 0.15
    return x.clamp(-1, 1)


def train(steps: int = 1500, batch: int = 64, seed: int = 0, lr: float = 2e-3) -> SceneClassifier:
    """Train on freshly generated scenes (never the held-out seeds)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    model = SceneClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    from tqdm import tqdm

    bar = tqdm(range(steps), desc="classifier", mininterval=10)
    for _ in bar:
        images, labels = single_batch(rng, batch)
        logits = model(augment(to_tensor(images), g))
        loss = sum(F.cross_entropy(logits[k], torch.from_numpy(labels[k])) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model


def load(path: Path = WEIGHTS) -> SceneClassifier:
    """The shipped classifier, in eval mode (safetensors only, no pickle)."""
    from safetensors.torch import load_file

    model = SceneClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


@torch.no_grad()
def predict(model: SceneClassifier, images: np.ndarray, batch: int = 256) -> dict[str, list[str]]:
    """Attribute names predicted for uint8 images (B, H, W, 3)."""
    out: dict[str, list[str]] = {k: [] for k in HEADS}
    for i in range(0, len(images), batch):
        logits = model(to_tensor(np.ascontiguousarray(images[i : i + batch])))
        for k, classes in HEADS.items():
            out[k].extend(classes[j] for j in logits[k].argmax(1).tolist())
    return out


def shape_colour(image: np.ndarray, contrast: int = 60) -> str:
    """The named colour nearest the median of the pixels unlike the image's corners (the shape).

    A direct reading for one shape on a plain background, used beside the classifier: the
    classifier learned clean renders and can misread a generated image's soft halo.
    """
    pixels = image.reshape(-1, 3).astype(int)
    corners = image[[0, 0, -1, -1], [0, -1, 0, -1]].astype(int)
    background = np.median(corners, axis=0)
    shape = pixels[np.abs(pixels - background).sum(1) > contrast]
    if not len(shape):
        return "none"
    median = np.median(shape, axis=0)
    return min(scenes.COLOURS, key=lambda name: float(((np.array(scenes.COLOURS[name]) - median) ** 2).sum()))


def held_out_accuracy(model: SceneClassifier, n: int = 2000) -> dict[str, float]:
    """Per-attribute accuracy on n one-shape scenes from seeds training never used."""
    images, labels = single_batch(np.random.default_rng(HELD_OUT_SEED), n)
    pred = predict(model, images)
    return {k: float(np.mean([HEADS[k].index(p) == t for p, t in zip(pred[k], labels[k])])) for k in HEADS}


def main() -> None:
    """CLI: train, save weights beside this module, print held-out accuracy as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    model = train(args.steps, seed=args.seed).eval()
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(args.out))
    acc = held_out_accuracy(load(args.out))
    print(json.dumps({"held_out_accuracy": acc, "n": 2000, "train_seconds": round(time.time() - start)}))


if __name__ == "__main__":
    main()
