"""Pure latent math: per-item noise, interpolation. No I/O, no global RNG."""

from __future__ import annotations

import torch


def item_generator(seed: int) -> torch.Generator:
    """A CPU generator for one item: its noise never depends on its batch or device."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def initial_noise(seed: int, shape: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` (no batch dim) drawn on CPU from the item's seed."""
    generator = generator if generator is not None else item_generator(seed)
    return torch.randn((1, *shape), generator=generator, dtype=torch.float32)[0]


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Linear interpolation (shrinks the norm of independent Gaussians between the ends)."""
    return a + (b - a) * t


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation over the flattened tensors; lerp when nearly parallel."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm())
    if cos.abs() > dot_threshold:
        return lerp(a, b, t)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    mixed = (torch.sin((1 - t) * theta) / sin) * a64 + (torch.sin(t * theta) / sin) * b64
    return mixed.reshape(a.shape).to(a.dtype)
