"""The even-timing pre-pass: how much the picture changes along each animation segment.

Candidates (the default where it applies). When every frame of a group of segments
would render exactly as a probe at its position does (linear easing, no per-frame
schedule or input, no ``probes:`` budget; _frames_are_candidates), probes are candidate
frames: t = 0 and 1 are the keyframes' own frames, positions sit on the frames' grid of t
(animation.POSITION_DIGITS), and the pre-pass bisects, in rounds of CANDIDATES_ROUND, the intervals of
largest change until it holds the group's frames + 1 and CANDIDATES_EXTRA (15%) more. The
frames are then chosen among the candidates (_Group.select: a minimax path of exactly
the group's frame count through every keyframe, each step's change measured between the
two pictures, as the smoothness report does), saved as a curve that places frame i on
the i-th chosen candidate, and written from the candidates' pictures: the run renders
no frame twice (pixel_key: a candidate and a frame with equal keys have equal pixels,
and a batch-independent render makes them bit-identical, which the tests check against
frames rendered anew). The pre-pass so costs its unchosen candidates and its rounds'
batches: 57 pictures in 8 batches for 49 frames where uniform timing renders 49 in 7.
On the test suite's four animations spread over the video it measures 1.44, 1.84, 1.42
and 2.34 (probes apart from frames at the default budget: 2.89 to 3.93). The candidates'
pictures wait on disk until they are written (Spilled, in CANDIDATES_FOLDER).

Probes (otherwise). For every segment of an animation with ``timing: even`` (per combination of the plan's
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

import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path

from .animation import POSITION_DIGITS
from .errors import SdbatchError
from .output import TEMP_MARK, atomic_write

TIMING_FILE = "timing.json"
CANDIDATES_FOLDER = ".sdbatch-candidates"  # candidates' pictures until they are written (temporary files)
FIRST = (0.0, 0.5, 1.0)  # probe positions before refining
BUDGET = 0.23  # probes per segment beyond t = 0, as a fraction of its frames (at least 2)
TOLERANCE = 1.5  # an interval holding more than this many frames' share of the change is bisected
MIN_WIDTH = 1 / 1024  # in t: a jump narrower than this is a cut, not worth more probes
DISTANCE_SIDE = 64
CANDIDATES_EXTRA = 0.15  # candidates beyond the group's frames + 1, as a fraction of them
CANDIDATES_ROUND = 8  # candidates per bisection round of a group: fixed, so frames never depend on the batch size
SELECT_WINDOW = 64  # a frame's predecessor is among the 64 candidates before it (bounds the selection's cost)


def load_timing(plan, root) -> dict:
    """Give the plan the curves saved in ``root``/timing.json (none there: frames stay provisional)."""
    path = Path(root) / TIMING_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {"segments": {}}
    if plan.timeline is not None and plan.timeline.timing == "even":
        plan.timeline.curves = saved["segments"]
    return saved


def measure_timing(plan, root, render, total: int, batch_size: int, say=None) -> tuple[dict | None, list]:
    """Measure the segments of the first ``total`` items that timing.json lacks.

    ``render(batches)`` renders lists of probe items (in this process or on workers), results in order;
    ``say(text)``, if given, tells the user what the pre-pass does before and after it.
    Returns (what was done, or None without even timing; the frames whose pictures candidates already
    are: their rendered results, relabelled as the frames, for the run to write instead of rendering).
    """
    timeline = plan.timeline
    if timeline is None or timeline.timing != "even":
        return None, []
    saved = load_timing(plan, root)
    began = time.monotonic()
    todo, groups, ranges = {}, [], []
    with timeline.as_written():  # segments start where the job file puts them, whatever the spread
        segments = timeline.segments()
        for base in range(0, total, timeline.frames):
            keys = timeline.curve_keys([plan.segment_key(base + segment.first, segment) for segment in segments])
            for group in timeline.groups():
                if base + segments[group[0]].first + 1 >= total:
                    continue
                missing = [i for i in group if keys[i] not in saved["segments"] and keys[i] not in todo]
                candidates = len(missing) == len(group) and _frames_are_candidates(
                    plan, base, [segments[i] for i in group])
                members = [_Probes(plan.item_at(base + segments[i].first), segments[i], timeline,
                                   plan.item_at(base + _end_frame(segments[i], timeline)) if candidates else None)
                           for i in missing]
                todo.update(zip([keys[i] for i in missing], members))
                if members:
                    groups.append(_Group(members))
                if candidates:  # the group's frames from its keyframe's (hold included) to its end keyframe's (a loop's
                    # way back ends before frame 0)
                    last = segments[group[-1]]
                    stop = last.last + 1 if _end_frame(last, timeline) else last.last
                    ranges.append(range(base + segments[group[0]].start.frame, min(total, base + stop)))
    if todo and say:
        how = "candidate frames" if ranges else "probes"
        say(f"even timing: measuring {len(todo)} animation segment{'s' * (len(todo) > 1)} ({how}) before rendering")
    pictures, candidates = _measure(groups, render, batch_size, Path(root) / CANDIDATES_FOLDER)
    seconds = time.monotonic() - began
    curves = {}
    for group in groups:
        curves.update(zip(group.members, group.curves(seconds / len(todo))))
    for key, probes in todo.items():
        saved["segments"][key] = curves[probes]
    if todo:
        saved["distance"] = f"mean |RGB difference| (0-255) of probes box-filtered to {DISTANCE_SIDE}px"
        atomic_write(Path(root) / TIMING_FILE, json.dumps(saved, indent=1).encode())
    timeline.curves = saved["segments"]
    reused = _reused_frames(plan, ranges, candidates)
    report = {"segments_measured": len(todo), "segments_saved": len(saved["segments"]),
              "probes": sum(len(p.ts) for p in todo.values()), "pictures": pictures, "seconds": round(seconds, 3)}
    if ranges:
        report["frames_from_candidates"] = len(reused)
    if todo and say:
        taken = f"; {len(reused)} frames taken from them" if ranges else ""
        say(f"even timing: {len(todo)} segment{'s' * (len(todo) > 1)} measured in {seconds:.1f}s from {pictures} "
            f"pictures{taken} (saved in {TIMING_FILE})")
    return report, reused


def pixel_key(item) -> str:
    """What decides an item's pixels, without the labels an animation frame carries (its frame number, its
    timing state, its keyframes' frames): a candidate and a frame with equal keys have equal pixels."""
    import hashlib

    content = item.content()
    animation = dict(content["extra"].get("animation") or {})
    for label in ("frame", "timing"):
        animation.pop(label, None)
    for end in ("from", "to"):
        if end in animation:
            animation[end] = {k: v for k, v in animation[end].items() if k != "frame"}
    content["extra"] = {**content["extra"], "animation": animation}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _end_frame(segment, timeline) -> int:
    """The frame showing a segment's end keyframe: where it stands, or frame 0 for a loop's way back."""
    return segment.last if segment.last < timeline.frames else 0


def _frames_are_candidates(plan, base: int, segments: list) -> bool:
    """May these segments' probes be candidate frames? When every frame between them renders as a probe
    at its position would: linear easing, no per-frame schedule or input, the default budget."""
    timeline = plan.timeline
    if timeline.probes is not None or any((s.start.easing or timeline.easing) != "linear" for s in segments):
        return False
    keys = set()
    for index in range(base + segments[0].start.frame, base + segments[-1].last):
        content = plan.item_at(index).content()
        for field in ("prompt", "negative_prompt", "seed"):  # the keyframe's: the same for a probe and a frame
            del content[field]
        content["extra"] = {k: v for k, v in content["extra"].items() if k != "animation"}
        keys.add(json.dumps(content, sort_keys=True, ensure_ascii=False))
        if len(keys) > 1:
            return False
    return True


def _reused_frames(plan, ranges: list, candidates: dict) -> list:
    """The planned frames of candidate groups whose pictures a candidate already is, as its results (any
    candidate with a frame's pixel key renders that frame's pixels: the chosen ones and the keyframes')."""
    reused = []
    for index in sorted({index for frames in ranges for index in frames}):
        item = plan.item_at(index)
        result = candidates.get(pixel_key(item))
        if result is not None:
            relabelled = copy.copy(result)  # the frame's own item (its number, its labels), the same pixels
            relabelled.item = item
            reused.append(relabelled)
    return reused


class _Probes:
    """The probes of one segment: positions, their pictures (downscaled) and the change between them."""

    def __init__(self, start, segment, timeline, end=None):
        """``end``: the item of the frame showing the end keyframe; given, the probes are candidate frames
        (candidates), and t = 0 and t = 1 are the start and end keyframes' own frames."""
        self.start, self.segment, self.timeline, self.end = start, segment, timeline, end
        self.candidates = end is not None
        self.budget = timeline.probes or max(2, int(BUDGET * segment.span)) + 1
        self.ts = list(FIRST)
        self.pictures: dict = {}

    def item(self, t: float):
        """The start frame's item moved to position t (candidates: at t = 0 and 1 the keyframes' frames)."""
        if self.candidates and t in (0, 1):
            return self.start if t == 0 else self.end
        animation = {"frame": self.segment.first, "t": round(t, POSITION_DIGITS) if self.candidates else t,
                     "from": self.segment.start.to_json(), "to": self.segment.end.to_json(),
                     "embeddings": self.timeline.embeddings, "noise": self.timeline.noise}
        return replace(self.start, extra={**self.start.extra, "animation": animation})

    def missing(self) -> list:
        return [t for t in self.ts if t not in self.pictures]

    def changes(self) -> list:
        return [distance(self.pictures[a], self.pictures[b]) for a, b in zip(self.ts, self.ts[1:])]

    def chosen_curve(self, ts: list, raw: list, seconds: float) -> dict:
        """The curve that places this segment's frames on the chosen candidates: frame i of m at ts[i].

        Its "change" is the frames' share (i/m), so animation.position_for lands on the candidates
        exactly; "frames" tells spread: video how many frames the segment takes."""
        count = len(ts)
        return {"t": [round(t, POSITION_DIGITS) for t in ts] + [1.0], "change": [i / count for i in range(count + 1)],
                "raw": [round(c, 4) for c in raw], "frames": count, "candidates": len(self.ts),
                "probes": len(self.ts), "seconds": round(seconds, 3)}

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
        self.candidates = all(probes.candidates for probes in members)
        if self.candidates:  # candidates for every frame and the group's end, 15% more, and each segment's own end
            self.budget = math.ceil((1 + CANDIDATES_EXTRA) * (self.frames + 1)) + len(members) - 1
        else:
            self.budget = sum(probes.budget for probes in members)
        self.rounds = 0

    def curves(self, seconds: float) -> list:
        """Each member's curve: frames chosen among the candidates, or (probes only) the measured change."""
        chosen = self.select() if self.candidates else None
        if chosen is None:
            return [probes.curve(seconds) for probes in self.members]
        return [probes.chosen_curve(ts, raw, seconds) for probes, (ts, raw) in zip(self.members, chosen)]

    def select(self) -> list | None:
        """Choose the group's frames among its candidates: per member (positions, changes between them).

        Exactly ``frames`` steps from the first member's t = 0 to the last one's t = 1, through every
        member's t = 0 (its keyframe), with the largest change between consecutive frames as small as it
        can be: a minimax path (dynamic programming over candidates, each step's change measured between
        the two pictures themselves, as the smoothness report will). None when too few candidates.
        """
        import numpy as np

        nodes = [(k, t) for k, probes in enumerate(self.members) for t in probes.ts
                 if t < 1 or k == len(self.members) - 1]
        pictures = [self.members[k].pictures[t] for k, t in nodes]
        count, steps = len(nodes), self.frames
        if count - 1 < steps:
            return None
        starts = [nodes.index((k, 0.0)) for k in range(len(self.members))]
        # best[s][j]: the smallest largest change of a path of s steps from node 0 to node j
        best = np.full((steps + 1, count), np.inf)
        best[0, 0] = 0.0
        before = np.zeros((steps + 1, count), dtype=np.int64)
        change = {}
        for j in range(1, count):
            low = max([start for start in starts if start < j], default=0)  # no step skips a keyframe
            low = max(low, j - SELECT_WINDOW)
            step = np.array([change.setdefault((i, j), distance(pictures[i], pictures[j])) for i in range(low, j)])
            worst = np.maximum(best[:-1, low:j], step[None, :])  # per number of steps, per predecessor
            i = np.argmin(worst, axis=1)  # of equals the earliest: deterministic
            best[1:, j], before[1:, j] = worst[np.arange(steps), i], low + i
        if not np.isfinite(best[steps, count - 1]):
            return None
        path = [count - 1]
        for s in range(steps, 0, -1):
            path.append(int(before[s, path[-1]]))
        path.reverse()
        chosen = [([], []) for _ in self.members]
        for a, b in zip(path, path[1:]):
            k, t = nodes[a]
            chosen[k][0].append(t)
            chosen[k][1].append(change[(a, b)])
        return chosen

    def refine(self) -> bool:
        return self._refine_candidates() if self.candidates else self._refine_probes()

    def _refine_candidates(self) -> bool:
        """Halve the CANDIDATES_ROUND intervals of largest measured change (wider than MIN_WIDTH) while the budget
        lasts: candidates gather where the picture changes, so frames chosen among them can follow it."""
        intervals = []
        for probes in self.members:
            intervals += [(c, a, b, probes) for c, a, b in zip(probes.changes(), probes.ts, probes.ts[1:])
                          if b - a > MIN_WIDTH]
        wanted = min(CANDIDATES_ROUND, self.budget - sum(len(probes.ts) for probes in self.members))
        chosen = sorted(intervals, key=lambda i: (-i[0], i[1], i[3].segment.first))[:max(0, wanted)]
        for _, a, b, probes in chosen:
            probes.ts = sorted(probes.ts + [(a + b) / 2])
        self.rounds += 1
        return bool(chosen)

    def _refine_probes(self) -> bool:
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


def _measure(groups: list, render, batch_size: int, spill: Path | None = None) -> tuple[int, dict]:
    """Render rounds of probes for all groups together (in batches of ``batch_size``), refining until even.

    Returns the number of pictures rendered and the candidates' results by pixel key, their pictures
    kept in ``spill`` (Spilled). A picture wanted twice (a keyframe's frame ends one segment and starts
    the next) is rendered once."""
    active, pictures, candidates = list(groups), 0, {}
    while active:
        wanted = [(probes, t) for group in active for probes in group.members for t in probes.missing()]
        unique = {}  # pixel key -> item
        keys = []
        for probes, t in wanted:
            item = probes.item(t)
            keys.append(pixel_key(item))
            unique.setdefault(keys[-1], item)
        items = list(unique.values())
        rendered = render([items[start:start + batch_size] for start in range(0, len(items), batch_size)])
        if len(rendered) != len(items):
            raise SdbatchError("the timing pre-pass failed to render some probes; see failures above")
        pictures += len(rendered)
        by_key = dict(zip(unique, rendered))
        small = {key: downscaled(result.image) for key, result in by_key.items()}
        for key, (probes, t) in zip(keys, wanted):
            probes.pictures[t] = small[key]
            if probes.candidates and key not in candidates:
                result = by_key[key]
                candidates[key] = Spilled(result, spill / f"{key[:32]}{TEMP_MARK}") if spill else result
        del rendered, by_key
        active = [group for group in active if group.refine()]
    return pictures, candidates


class Spilled:
    """A candidate's result whose picture waits on disk, read back each time a writer asks for it: the
    candidates of a long animation (every frame and 15% more) never sit in memory together. Lossless (the
    pixels as a NumPy array), temporary (a kill leaves files the next run's tidy removes)."""

    def __init__(self, result, path: Path):
        import numpy as np

        self.item, self.model_hash = getattr(result, "item", None), getattr(result, "model_hash", "")
        self.seconds, self.outputs = getattr(result, "seconds", 0.0), getattr(result, "outputs", {})
        self.path, self.mode = path, result.image.mode
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            np.save(handle, np.asarray(result.image), allow_pickle=False)

    @property
    def image(self):
        import numpy as np
        from PIL import Image

        with open(self.path, "rb") as handle:
            return Image.fromarray(np.load(handle, allow_pickle=False), self.mode)


def drop_candidates(root) -> None:
    """Remove the candidates' pictures once the frames taken from them are written."""
    import shutil

    shutil.rmtree(Path(root) / CANDIDATES_FOLDER, ignore_errors=True)


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
