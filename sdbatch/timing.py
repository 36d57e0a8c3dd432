"""The even-timing pre-pass: how much the picture changes along each animation segment.

For every segment of an animation with ``timing: even`` (per combination of the plan's
other axes) it renders *probes*: the segment's start frame moved to interpolation
positions t. Segments that share frames are measured as a group: each segment alone,
or with ``spread: video`` those between keyframes that stay (animation.Timeline.groups),
so probes go where the group's change, and so its frames, will be. Probing starts at
t = 0, 1/2 and 1 in every segment; then intervals are bisected while they hold more than
TOLERANCE frames' share of the group's change and the budget lasts (per segment
int(BUDGET x frames) + 1 probes, at least 3: 6 for 24 frames, 12 for the example's two
segments). The first round after t = 0, 1/2, 1 spends a third of the budget left
descending on estimates (the interval that changes most is halved, each half taken to
hold half its change, again and again), the second the rest on the intervals that
measured most, one probe each. Rounds are sized by the group's budget alone and share
batches across groups.

Cost. On the CPU a probe costs about 0.23 s per picture plus 0.45 s per batch (20 steps,
sdbatch-tiny, one thread), the same as a frame: the pre-pass's three batches of 6, 2 and
4 probes come to (3 x 0.45 + 12 x 0.23) / (7 x 0.45 + 49 x 0.23) = 0.29 of the example's
49 frames in batches of 8 by that model, and measure 0.22 to 0.28 (0.26 pooled over four
runs of bench/bench_animation.py --repeat 4).
Each round is a batch, so rounds cost: 14 probes in rounds of 6, 4 and 4 measured 0.24 to
0.37 (0.30 and 0.31 pooled over two sets of four runs), over the limit of 0.30; four
rounds (6, 4, 2, 2) 0.30 to 0.38. One round of 8 after t = 0, 1/2, 1 (two batches)
descends on estimates only and leaves the example at 3.17. Which probes a budget this
small affords decides where a snap falls: with 12 probes split 6, 3, 3 the example
measures 3.30, with 6, 1, 5 3.09, with 6, 2, 4 (these rounds) 2.87.
On the test suite's four animations (6 steps) these rounds measure 2.89, 3.60, 3.69 and
3.93, rounds of 6, 4 and 4 measure 2.15, 5.60, 2.68 and 3.52: at a budget the cost limit
allows, the target of 3 is met on the example and one of the four, not in general.

More probes. ``interpolate.probes: N`` (Timeline.probes) replaces the default budget with N
probes per segment; the rounds are the same. At 32 the four test animations measure 1.43,
1.47, 1.19 and 1.19 and the example 1.26, at about the cost of the render itself (1.11
pooled over three runs); at 24 1.33, 2.19, 1.27, 1.91 and 1.94 (0.89), at 16 2.21, 3.77, 1.60,
3.50 and 2.62 (0.65). A user's budget is part of the segment key, so it never
reuses the default's curves (nor they its).

The cumulative change, normalised to 0..1, and the raw changes are saved in the output
folder's ``timing.json`` under the segment's content key (with the group's when it has
several). The plan then places frame i of n at the t where a fraction ease(i/n) of the
change has happened (animation.position_for), and with ``spread: video`` gives each
segment frames in proportion to its total change, so frames are ordinary items and a
resumed, re-batched or Ray run plans exactly the same ones.

Probes render with the frames' own steps and size, at a subset of positions, with the
schedule values of the segment's start frame (the frames' own are not known before the
curve is; in the example one unit of guidance moves its snap by about 1/1024 of t).
Cheaper probes were measured and are not faithful: with 5 of the example's 20 DDIM steps the
change along its first segment is flat (2.3 to 4.7 per sixteenth of t), while the real
frames idle and then snap (0.05 to 6.8 per frame); lower resolution changes the noise
and so the picture. The x0 the model predicts after the first k of the same 20 steps,
decoded, is cheaper by (20 - k)/20 of the denoising: at k = 14 its change along the
example's 24 -> 48 segment peaks at t 0.53 to 0.56 while the frames snap at 0.516 to
0.531 (mean |RGB| 26 from the finished pictures), at k = 17 it follows them (8 away)
but saves only 15%. A jump the full-step probes see is where the frames jump.

The example's snap is narrow: at 1/1024 of t it changes 2.5, 2.9 and 2.0 around t = 0.52
of the 24 -> 48 segment, within 0.004 of t, narrower than two frames are apart. Its probes
bracket it between t = 1/2 and 5/8 (change 28.3), so it still falls inside one step
(frames at t 0.508 and 0.522: 8.6); evening out the rest of the video puts the median step
at 3.01, so the largest is 2.87 times the median. Splitting the snap over frames takes
probes 1/128 of t apart there, about four more rounds.

Distance: mean absolute difference of the 0-255 RGB pixels of the probes, box-filtered
down to at most 64 pixels a side. It is the quantity the smoothness report measures
(and the issue's target is stated in), so the pre-pass evens out what the report shows;
the box filter is a blur that discounts fine texture few-step probes do not render
faithfully and bounds the cost on large frames. VAE latents are not in the render
contract's results, and the project's classifier knows only sdbatch-tiny's scenes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

from .errors import SdbatchError
from .output import atomic_write

TIMING_FILE = "timing.json"
FIRST = (0.0, 0.5, 1.0)  # probe positions before refining
BUDGET = 0.23  # probes per segment beyond t = 0, as a fraction of its frames (at least 2)
TOLERANCE = 1.5  # an interval holding more than this many frames' share of the change is bisected
MIN_WIDTH = 1 / 1024  # in t: a jump narrower than this is a cut, not worth more probes
DISTANCE_SIDE = 64


def load_timing(plan, root) -> dict:
    """Give the plan the curves saved in ``root``/timing.json (none there: frames stay provisional)."""
    path = Path(root) / TIMING_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {"segments": {}}
    if plan.timeline is not None and plan.timeline.timing == "even":
        plan.timeline.curves = saved["segments"]
    return saved


def measure_timing(plan, root, render, total: int, batch_size: int) -> dict | None:
    """Measure the segments of the first ``total`` items that timing.json lacks; return what was done.

    ``render(batches)`` renders lists of probe items (in this process or on workers), results in order.
    """
    timeline = plan.timeline
    if timeline is None or timeline.timing != "even":
        return None
    saved = load_timing(plan, root)
    began = time.monotonic()
    todo, groups = {}, []
    with timeline.as_written():  # segments start where the job file puts them, whatever the spread
        segments = timeline.segments()
        for base in range(0, total, timeline.frames):
            keys = timeline.curve_keys([plan.segment_key(base + segment.first, segment) for segment in segments])
            for group in timeline.groups():
                if base + segments[group[0]].first + 1 >= total:
                    continue
                missing = [i for i in group if keys[i] not in saved["segments"] and keys[i] not in todo]
                members = [_Probes(plan.item_at(base + segments[i].first), segments[i], timeline) for i in missing]
                todo.update(zip([keys[i] for i in missing], members))
                if members:
                    groups.append(_Group(members))
    _measure(groups, render, batch_size)
    seconds = time.monotonic() - began
    for key, probes in todo.items():
        saved["segments"][key] = probes.curve(seconds / len(todo))
    if todo:
        saved["distance"] = f"mean |RGB difference| (0-255) of probes box-filtered to {DISTANCE_SIDE}px"
        atomic_write(Path(root) / TIMING_FILE, json.dumps(saved, indent=1).encode())
    timeline.curves = saved["segments"]
    return {"segments_measured": len(todo), "segments_saved": len(saved["segments"]),
            "probes": sum(len(p.ts) for p in todo.values()), "seconds": round(seconds, 3)}


class _Probes:
    """The probes of one segment: positions, their pictures (downscaled) and the change between them."""

    def __init__(self, start, segment, timeline):
        self.start, self.segment, self.timeline = start, segment, timeline
        self.budget = timeline.probes or max(2, int(BUDGET * segment.span)) + 1
        self.ts = list(FIRST)
        self.pictures: dict = {}

    def item(self, t: float):
        """The start frame's item moved to position t."""
        animation = {"frame": self.segment.first, "t": t, "from": self.segment.start.to_json(),
                     "to": self.segment.end.to_json(), "embeddings": self.timeline.embeddings,
                     "noise": self.timeline.noise}
        return replace(self.start, extra={**self.start.extra, "animation": animation})

    def missing(self) -> list:
        return [t for t in self.ts if t not in self.pictures]

    def changes(self) -> list:
        return [distance(self.pictures[a], self.pictures[b]) for a, b in zip(self.ts, self.ts[1:])]

    def curve(self, seconds: float) -> dict:
        changes = self.changes()
        total = sum(changes)
        cumulative = [0.0]
        for change in changes:
            cumulative.append(cumulative[-1] + (change / total if total else 1 / len(changes)))
        cumulative[-1] = 1.0
        return {"t": self.ts, "change": [round(c, 6) for c in cumulative], "raw": [round(c, 4) for c in changes],
                "probes": len(self.ts), "seconds": round(seconds, 3)}


class _Group:
    """Segments that share their frames (one, or with spread: video several): one probe budget, spent where
    the change is."""

    def __init__(self, members: list):
        self.members = members
        self.frames = sum(probes.segment.span for probes in members)
        self.budget = sum(probes.budget for probes in members)
        self.rounds = 0

    def refine(self) -> bool:
        """Choose the positions of the next round; False when even or out of budget.

        An interval is uneven while it holds over TOLERANCE frames' share of the group's change. The first
        round after t = 0, 1/2, 1 spends a third of the budget left descending on estimates: the interval that
        changes most is halved (each half taken to hold half its change), again and again, so it can
        reach into a snap it only knows the size of. Later rounds halve the uneven intervals that measured
        most, one probe each: their picks are final (no round after sees them), so they go to the largest
        measured changes rather than to estimates. A round's size follows the group's budget alone, never
        the batch size or the other groups, so the probes (and the frames) do not depend on them either.
        """
        intervals = []
        for probes in self.members:
            intervals += [(c, a, b, probes) for c, a, b in zip(probes.changes(), probes.ts, probes.ts[1:])]
        share = sum(c for c, *_ in intervals) / self.frames
        left = self.budget - sum(len(probes.ts) for probes in self.members)
        first = self.rounds == 0
        wanted = math.ceil(left / 3) if first else left
        self.rounds += 1
        uneven = [i for i in intervals if i[0] > TOLERANCE * share and i[2] - i[1] > MIN_WIDTH]
        if first:  # descend: the largest (estimated) change first, of equals the later interval
            chosen = []
            while len(chosen) < wanted and uneven:
                change, a, b, probes = max(uneven, key=lambda i: (i[0], i[1], i[3].segment.first))
                uneven.remove((change, a, b, probes))
                chosen.append((change, a, b, probes))
                middle = (a + b) / 2
                uneven += [h for h in ((change / 2, a, middle, probes), (change / 2, middle, b, probes))
                           if h[0] > TOLERANCE * share and h[2] - h[1] > MIN_WIDTH]
        else:  # the largest measured changes, of equals the earlier interval
            chosen = sorted(uneven, key=lambda i: (-i[0], i[1], i[3].segment.first))[:wanted]
        for _, a, b, probes in chosen:
            probes.ts = sorted(probes.ts + [(a + b) / 2])
        return bool(chosen)


def _measure(groups: list, render, batch_size: int) -> None:
    """Render rounds of probes for all groups together (in batches of ``batch_size``), refining until even."""
    active = list(groups)
    while active:
        wanted = [(probes, t) for group in active for probes in group.members for t in probes.missing()]
        items = [probes.item(t) for probes, t in wanted]
        results = render([items[start:start + batch_size] for start in range(0, len(items), batch_size)])
        if len(results) != len(items):
            raise SdbatchError("the timing pre-pass failed to render some probes; see failures above")
        for (probes, t), result in zip(wanted, results):
            probes.pictures[t] = downscaled(result.image)
        active = [group for group in active if group.refine()]


def downscaled(image):
    """The picture as float RGB, box-filtered so its longer side is at most DISTANCE_SIDE pixels."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    factor = max(1, math.ceil(max(image.size) / DISTANCE_SIDE))
    if factor > 1:
        image = image.reduce(factor)  # a box filter: each output pixel averages factor x factor
    return np.asarray(image, dtype=np.float32)


def distance(a, b) -> float:
    """Mean absolute RGB difference (0-255) of two downscaled pictures."""
    import numpy as np

    return float(np.abs(a - b).mean())
