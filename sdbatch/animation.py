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

Spread. With ``spread: video`` (even timing only) the keyframes between the first, the
last and any with ``pin`` also move: between two fixed keyframes the frames that move
(all but the holds) are shared among the segments in proportion to each one's measured
change (the sum of its probes' changes), at least one each, so a frame changes the
picture about as much in every segment, as DiffMorpher re-times a whole morph. Such a
group's segments are measured together on the keyframes as written (their probes go
where the group's change is, so their curves are saved under keys that name the
group); schedules stay on the video's frames.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

from .latents import easing as easing_by_name

TIMING_VERSION = 2  # part of every segment key: a change of the pre-pass re-measures
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
    pin: bool = False  # spread: video leaves it on its frame

    def to_json(self) -> dict:
        data = asdict(self)
        return {k: v for k, v in data.items() if v is not None and k not in ("easing", "hold", "pin")}


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
    spread: str = "segment"  # or "video": keyframes not pinned move with the measured change
    probes: int | None = None  # the pre-pass's probes per segment; None: timing.BUDGET's share of its frames
    _layouts: dict = field(default_factory=dict, repr=False, compare=False)
    _written: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    def __getstate__(self) -> dict:  # plans travel to Ray workers: caches and the thread's state stay here
        return {**self.__dict__, "_layouts": {}, "_written": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _written=threading.local())

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

    def segments(self, keyframes: list | None = None) -> list:
        """Every interpolating segment, in frame order (holds are not segments): of the keyframes as written,
        or as placed (a loop's closing segment keeps its written length)."""
        keyframes = keyframes or self.keyframes
        result = [Segment(a, b, a.frame + a.hold, b.frame) for a, b in zip(keyframes, keyframes[1:])]
        if self.loop:
            last = keyframes[-1]
            first = last.frame + last.hold
            result.append(Segment(last, keyframes[0], first, first + self.loop_span))
        return [s for s in result if s.span > 0]

    def segment_at(self, f: int, segments: list | None = None) -> Segment | None:
        """The segment frame ``f`` moves along (strictly after its start), or None on a keyframe or hold."""
        segments = segments or self.segments()
        position = bisect.bisect_right([s.first for s in segments], f) - 1
        if position >= 0 and segments[position].first < f < segments[position].last:
            return segments[position]
        return None

    def keyframe_at(self, f: int, keyframes: list | None = None) -> Keyframe:
        """The keyframe frame ``f`` shows or leaves from."""
        keyframes = keyframes or self.keyframes
        starts = [k.frame for k in keyframes]
        return keyframes[max(0, bisect.bisect_right(starts, f) - 1)]

    @contextmanager
    def as_written(self):
        """Plan frames on the keyframes as written, whatever the spread (segment keys and probes start there)."""
        depth = getattr(self._written, "depth", 0)
        self._written.depth = depth + 1
        try:
            yield self
        finally:
            self._written.depth = depth

    def groups(self) -> list:
        """Indices of the segments (as written) that share their frames: each alone, or with ``spread: video``
        the segments between keyframes that stay (the first, the last, pinned ones; a loop's closing segment)."""
        count = len(self.segments())
        if self.spread != "video":
            return [[i] for i in range(count)]
        stay = {0, len(self.keyframes) - 1} | {i for i, k in enumerate(self.keyframes) if k.pin}
        groups, current = [], []
        for i in range(len(self.keyframes) - 1):
            current.append(i)
            if i + 1 in stay:
                groups.append(current)
                current = []
        return groups + ([[count - 1]] if self.loop else [])

    def curve_keys(self, keys: list) -> list:
        """The keys the segments' curves are saved under: their own, or in a group of several (spread: video,
        measured together) their own with the group's, as the probes of one depend on the others."""
        result = list(keys)
        for group in self.groups():
            if len(group) > 1:
                members = [keys[i] for i in group]
                for i in group:
                    content = {"spread": "video", "group": members, "segment": keys[i]}
                    result[i] = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]
        return result

    def placed(self, segment_key=None) -> tuple:
        """(keyframes on the frames they show, each segment's curve key); (None, None) while ``spread: video``
        lacks a measured curve."""
        if self.spread != "video" or self.timing != "even" or getattr(self._written, "depth", 0) or not segment_key:
            return self.keyframes, None
        with self.as_written():
            keys = tuple(self.curve_keys([segment_key(segment) for segment in self.segments()]))
        curves = self.curves or {}
        if not all(key in curves for key in keys):
            return None, None
        cache = (id(curves), keys)
        if cache not in self._layouts:
            # frames chosen among candidates say how many each segment takes; measured curves share them by change
            totals = [curves[key].get("frames") or sum(curves[key]["raw"]) for key in keys]
            self._layouts[cache] = spread_keyframes(self.keyframes, totals[:len(self.keyframes) - 1]), keys
        return self._layouts[cache]

    def frame(self, f: int, segment_key=None) -> dict:
        """Item fields for frame ``f``: its keyframe's prompt/seed, scheduled values and ``extra``.

        ``segment_key(segment)`` gives the content key of a segment (needed for even timing).
        """
        keyframes, keys = self.placed(segment_key)
        provisional = keyframes is None
        keyframes = keyframes or self.keyframes
        segments = self.segments(keyframes)
        start = self.keyframe_at(f, keyframes)
        segment = self.segment_at(f, segments)
        animation = {"frame": f, "t": 0.0, "from": start.to_json()}
        u = 0.0
        if segment is not None:
            start = segment.start
            u = float(easing_by_name(start.easing or self.easing)((f - segment.first) / segment.span))
        if u > 0:  # an easing that is still at 0 leaves the frame on its keyframe
            animation.update({"t": u, "from": start.to_json(), "to": segment.end.to_json(),
                              "embeddings": self.embeddings, "noise": self.noise})
            if self.timing == "even":
                curve, position = None, segments.index(segment)
                if keys is not None:
                    curve = self.curves[keys[position]]
                elif segment_key is not None and not provisional:
                    with self.as_written():  # its curve is keyed by the segment as written
                        curve = (self.curves or {}).get(segment_key(self.segments()[position]))
                if curve is None or provisional:
                    animation["timing"] = "provisional"
                else:
                    animation.update(t=position_for(curve, u), timing="even")
        elif provisional and not start.pin and start not in (self.keyframes[0], self.keyframes[-1]):
            animation["timing"] = "provisional"  # a keyframe that spread: video will move
        fields = {"prompt": start.prompt, "negative_prompt": start.negative_prompt, "seed": start.seed}
        fields.update({name: values[f] for name, values in self.schedules.items()})
        return {"fields": fields, "animation": animation}


def spread_keyframes(keyframes: list, totals: list) -> list:
    """Keyframes moved so that between fixed ones (first, last, pinned) frames follow each segment's change."""
    fixed = [0] + [i for i, k in enumerate(keyframes[1:-1], 1) if k.pin] + [len(keyframes) - 1]
    placed = list(keyframes)
    for a, b in zip(fixed, fixed[1:]):
        moving = keyframes[b].frame - keyframes[a].frame - sum(k.hold for k in keyframes[a:b])
        frame = keyframes[a].frame
        for i, share in zip(range(a, b - 1), apportion(moving, totals[a:b])):
            frame += keyframes[i].hold + share
            placed[i + 1] = replace(keyframes[i + 1], frame=frame)
    return placed


def apportion(count: int, weights: list) -> list:
    """``count`` split in proportion to ``weights`` (largest remainders, ties to the earlier), at least 1 each."""
    total = sum(weights)
    exact = [count * w / total if total > 0 else count / len(weights) for w in weights]
    shares = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: (shares[i] - exact[i], i))[:count - sum(shares)]:
        shares[i] += 1
    for i, share in enumerate(shares):
        if share == 0:  # every segment keeps a frame: taken from the longest
            shares[i] = 1
            shares[max(range(len(shares)), key=lambda j: (shares[j], -j))] -= 1
    return shares


def segment_key(start_item_id: str, segment: Segment, timeline: Timeline) -> str:
    """What a segment's change curve depends on: its start frame's item, where it goes, how it mixes."""
    content = {"version": TIMING_VERSION, "start": start_item_id, "to": segment.end.to_json(),
               "span": segment.span, "embeddings": timeline.embeddings, "noise": timeline.noise}
    if timeline.probes is not None:  # a budget of the user's: its own curve (the default's keys stay as they were)
        content["probes"] = timeline.probes
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
