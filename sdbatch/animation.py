"""Animations as plans: a timeline of keyframes turns each frame into an ordinary item.

A frame item carries its keyframe neighbours and its eased position between them in
``item.extra["animation"]``, so frames render in any order, batch or worker, and the
video is assembled from finished frames. Nothing here imports torch.

Timing. ``uniform`` spaces frames evenly in the interpolation parameter t. ``even``
spaces them evenly in how much the picture changes: a pre-pass at the start of ``run``
(sdbatch/timing.py) measures the change along t for each segment and saves the curve in
the output folder's ``timing.json``, keyed by the segment's content; the plan maps each
frame's eased position through the inverse of that curve. Until a curve is loaded, even
frames are *provisional*: uniform positions, marked so in their ``extra`` (and so in
their id), never rendered.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import asdict, dataclass, field

from .latents import easing as easing_by_name

TIMING_VERSION = 1  # part of every segment key: a change of the pre-pass re-measures
POSITION_DIGITS = 6  # t is rounded so ids never depend on the last bits of a float


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
    hold: int = 0  # frames after this one that show it unchanged before moving on

    def to_json(self) -> dict:
        data = asdict(self)
        return {k: v for k, v in data.items() if v is not None and k not in ("easing", "hold")}


@dataclass(frozen=True)
class Segment:
    """Frames ``first`` (t = 0, the start keyframe) to ``last`` (the end keyframe's frame, t = 1)."""

    start: Keyframe
    end: Keyframe
    first: int
    last: int

    @property
    def span(self) -> int:
        return self.last - self.first


@dataclass
class Timeline:
    """Keyframes, per-frame schedules and interpolation modes of one animation."""

    keyframes: list  # of Keyframe, sorted by frame, the first at frame 0
    fps: float = 12.0
    embeddings: str = "slerp"
    noise: str = "slerp"
    easing: str = "linear"
    schedules: dict = field(default_factory=dict)  # parameter -> value per frame
    timing: str = "uniform"  # or "even"
    loop: bool = False  # the last segment interpolates back to the first keyframe
    curves: dict | None = None  # segment key -> {"t": [...], "change": [...]}; None until measured

    @property
    def frames(self) -> int:
        """Frames in the video: to the last keyframe and its hold, plus the way back when looping."""
        last = self.keyframes[-1]
        end = last.frame + last.hold
        return end + self.loop_span if self.loop else end + 1

    @property
    def loop_span(self) -> int:
        """Frames of the closing segment: as long as the segment before it (or the hold itself)."""
        if len(self.keyframes) > 1:
            return self.keyframes[-1].frame - self.keyframes[-2].frame - self.keyframes[-2].hold
        return max(1, self.keyframes[0].hold)

    def segments(self) -> list:
        """Every interpolating segment, in frame order (holds are not segments)."""
        result = [Segment(a, b, a.frame + a.hold, b.frame) for a, b in zip(self.keyframes, self.keyframes[1:])]
        if self.loop:
            last = self.keyframes[-1]
            first = last.frame + last.hold
            result.append(Segment(last, self.keyframes[0], first, first + self.loop_span))
        return [s for s in result if s.span > 0]

    def segment_at(self, f: int) -> Segment | None:
        """The segment frame ``f`` moves along (strictly after its start), or None on a keyframe or hold."""
        segments = self.segments()
        position = bisect.bisect_right([s.first for s in segments], f) - 1
        if position >= 0 and segments[position].first < f < segments[position].last:
            return segments[position]
        return None

    def keyframe_at(self, f: int) -> Keyframe:
        """The keyframe frame ``f`` shows or leaves from."""
        starts = [k.frame for k in self.keyframes]
        return self.keyframes[max(0, bisect.bisect_right(starts, f) - 1)]

    def frame(self, f: int, segment_key=None) -> dict:
        """Item fields for frame ``f``: its keyframe's prompt/seed, scheduled values and ``extra``.

        ``segment_key(segment)`` gives the content key of a segment (needed for even timing).
        """
        start = self.keyframe_at(f)
        segment = self.segment_at(f)
        animation = {"frame": f, "t": 0.0, "from": start.to_json()}
        u = 0.0
        if segment is not None:
            start = segment.start
            u = float(easing_by_name(start.easing or self.easing)((f - segment.first) / segment.span))
        if u > 0:  # an easing that is still at 0 leaves the frame on its keyframe
            animation.update({"t": u, "from": start.to_json(), "to": segment.end.to_json(),
                              "embeddings": self.embeddings, "noise": self.noise})
            if self.timing == "even":
                curve = (self.curves or {}).get(segment_key(segment)) if segment_key else None
                if curve is None:
                    animation["timing"] = "provisional"
                else:
                    animation.update(t=position_for(curve, u), timing="even")
        fields = {"prompt": start.prompt, "negative_prompt": start.negative_prompt, "seed": start.seed}
        fields.update({name: values[f] for name, values in self.schedules.items()})
        return {"fields": fields, "animation": animation}


def segment_key(start_item_id: str, segment: Segment, timeline: Timeline) -> str:
    """What a segment's change curve depends on: its start frame's item, where it goes, how it mixes."""
    content = {"version": TIMING_VERSION, "start": start_item_id, "to": segment.end.to_json(),
               "span": segment.span, "embeddings": timeline.embeddings, "noise": timeline.noise}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def position_for(curve: dict, u: float) -> float:
    """The t at which a fraction ``u`` of the segment's measured change has happened (linear between probes)."""
    ts, change = curve["t"], curve["change"]
    if u <= 0 or u >= 1:
        return float(min(max(u, 0.0), 1.0))
    j = min(max(bisect.bisect_right(change, u) - 1, 0), len(change) - 2)
    while j > 0 and change[j] == change[j + 1]:
        j -= 1
    width = change[j + 1] - change[j]
    fraction = (u - change[j]) / width if width > 0 else 0.0
    return round(ts[j] + fraction * (ts[j + 1] - ts[j]), POSITION_DIGITS)
