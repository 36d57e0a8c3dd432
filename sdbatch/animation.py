"""Animations as plans: a timeline of keyframes turns each frame into an ordinary item.

A frame item carries its keyframe neighbours and its eased position between them in
``item.extra["animation"]``, so frames render in any order, batch or worker, and the
video is assembled from finished frames. Nothing here imports torch.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field

from .latents import easing as easing_by_name


@dataclass(frozen=True)
class Keyframe:
    """What holds at one frame: prompt, negative prompt and seed, or an image to invert."""

    frame: int
    prompt: str
    negative_prompt: str
    seed: int
    image: str | None = None  # path of an image keyframe (inverted to its initial latent)
    image_sha256: str | None = None  # in the item id, so a changed image renders again
    easing: str | None = None  # easing of the segment that starts here

    def to_json(self) -> dict:
        data = asdict(self)
        return {k: v for k, v in data.items() if v is not None and k != "easing"}


@dataclass
class Timeline:
    """Keyframes, per-frame schedules and interpolation modes of one animation."""

    keyframes: list  # of Keyframe, sorted by frame, the first at frame 0
    fps: float = 12.0
    embeddings: str = "slerp"
    noise: str = "slerp"
    easing: str = "linear"
    schedules: dict = field(default_factory=dict)  # parameter -> value per frame

    @property
    def frames(self) -> int:
        return self.keyframes[-1].frame + 1

    def frame(self, f: int) -> dict:
        """Item fields for frame ``f``: its keyframe's prompt/seed, scheduled values and ``extra``."""
        starts = [k.frame for k in self.keyframes]
        position = bisect.bisect_right(starts, f) - 1
        start = self.keyframes[position]
        following = self.keyframes[position + 1] if position + 1 < len(self.keyframes) else None
        t = 0.0
        if following is not None and f > start.frame:
            u = (f - start.frame) / (following.frame - start.frame)
            t = float(easing_by_name(start.easing or self.easing)(u))
        animation = {"frame": f, "t": t, "from": start.to_json()}
        if t > 0:
            animation.update(to=following.to_json(), embeddings=self.embeddings, noise=self.noise)
        fields = {"prompt": start.prompt, "negative_prompt": start.negative_prompt, "seed": start.seed}
        fields.update({name: values[f] for name, values in self.schedules.items()})
        return {"fields": fields, "animation": animation}
