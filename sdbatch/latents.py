"""Pure latent math: per-item noise, interpolation, easing. No I/O, no global RNG.

torch is imported inside the functions that need it, so planning (which uses the
easing curves) never loads it.
"""

from __future__ import annotations

import math
import re


# ---------------------------------------------------------------- noise
def item_generator(seed: int):
    """A CPU generator for one item: its noise never depends on its batch or device."""
    import torch

    return torch.Generator(device="cpu").manual_seed(int(seed))


def initial_noise(seed: int, shape: tuple, generator=None):
    """Standard normal noise of ``shape`` (no batch dim) drawn on CPU from the item's seed."""
    import torch

    generator = generator if generator is not None else item_generator(seed)
    return torch.randn((1, *shape), generator=generator, dtype=torch.float32)[0]


# ---------------------------------------------------------------- interpolation
def lerp(a, b, t: float):
    """Linear interpolation (shrinks the norm of independent Gaussians between the ends)."""
    if t == 0:
        return a
    if t == 1:
        return b
    return a + (b - a) * t


def slerp(a, b, t: float, dot_threshold: float = 0.9995):
    """Spherical interpolation over the flattened tensors; lerp when nearly parallel."""
    if t == 0:
        return a
    if t == 1:
        return b
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = (a64 @ b64) / (a64.norm() * b64.norm())
    if abs(float(cos)) > dot_threshold:
        return lerp(a, b, t)
    theta = math.acos(float(cos))
    sin = math.sin(theta)
    mixed = (math.sin((1 - t) * theta) / sin) * a64 + (math.sin(t * theta) / sin) * b64
    return mixed.reshape(a.shape).to(a.dtype)


def slerp_rows(a, b, t: float):
    """slerp of each row (token) of (tokens, features) tensors, as prompt embeddings need."""
    import torch

    if t == 0:
        return a
    if t == 1:
        return b
    return torch.stack([slerp(x, y, t) for x, y in zip(a, b)])


MIXERS = {"lerp": lerp, "slerp": slerp}


# ---------------------------------------------------------------- easing
def ease_linear(u: float) -> float:
    """Constant speed."""
    return u


def ease_in(u: float) -> float:
    """Cubic ease-in: starts slow."""
    return u * u * u


def ease_out(u: float) -> float:
    """Cubic ease-out: ends slow."""
    return 1 - (1 - u) ** 3


def ease_in_out(u: float) -> float:
    """Cubic ease-in-out: slow at both ends."""
    return 4 * u**3 if u < 0.5 else 1 - (-2 * u + 2) ** 3 / 2


def ease_cosine(u: float) -> float:
    """Half a cosine wave: smooth at both ends."""
    return (1 - math.cos(math.pi * u)) / 2


def cubic_bezier(x1: float, y1: float, x2: float, y2: float):
    """CSS-style cubic-bezier(x1, y1, x2, y2) easing; x1, x2 in [0, 1] keep it a function."""

    def curve(p1: float, p2: float, s: float) -> float:
        return 3 * (1 - s) ** 2 * s * p1 + 3 * (1 - s) * s * s * p2 + s**3

    def ease(u: float) -> float:
        if u <= 0 or u >= 1:
            return float(min(max(u, 0.0), 1.0))
        lo, hi = 0.0, 1.0
        for _ in range(60):  # x(s) is monotone for x1, x2 in [0, 1]: bisection converges
            mid = (lo + hi) / 2
            if curve(x1, x2, mid) < u:
                lo = mid
            else:
                hi = mid
        return curve(y1, y2, (lo + hi) / 2)

    return ease


EASINGS = {
    "linear": ease_linear, "ease-in": ease_in, "ease-out": ease_out,
    "ease-in-out": ease_in_out, "cosine": ease_cosine,
}
_BEZIER = re.compile(r"cubic-bezier\(\s*([-\d.]+)\s*,\s*([-\d.]+)\s*,\s*([-\d.]+)\s*,\s*([-\d.]+)\s*\)")


def easing(name: str):
    """An easing function by name, or 'cubic-bezier(x1, y1, x2, y2)'; ValueError if unknown."""
    if name in EASINGS:
        return EASINGS[name]
    match = _BEZIER.fullmatch(name.strip())
    if match:
        x1, y1, x2, y2 = map(float, match.groups())
        if not (0 <= x1 <= 1 and 0 <= x2 <= 1):
            raise ValueError("cubic-bezier x1 and x2 must lie in [0, 1]")
        return cubic_bezier(x1, y1, x2, y2)
    raise ValueError(f"unknown easing {name!r}; use {', '.join(EASINGS)} or cubic-bezier(x1, y1, x2, y2)")
