"""Animation outputs: frame images and videos (mp4/webm through imageio-ffmpeg, GIF and WebP).

Videos are assembled at the end of every run from the finished frames, so a resumed
run rebuilds them; each is written to a temporary name and renamed.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Literal

from sdbatch import hookimpl
from sdbatch.api import Writer
from sdbatch.inputs import audio_problem
from sdbatch.output import check_template

from .images import ImageWriter, JpegWriter, PngWriter


@dataclass
class FramesOptions:
    format: Literal["png", "jpeg", "webp"] = "png"
    path: str = field(default="frames/{job}/{frame:05d}-{id}.{ext}", metadata={"help": "output path template"})
    quality: int = field(default=92, metadata={"min": 1, "max": 100})
    compress_level: int = field(default=4, metadata={"min": 0, "max": 9})
    metadata: bool = True


class FramesWriter(ImageWriter):
    """Each animation frame as an image with its frame's A1111 parameters."""

    name = "frames"
    description = "animation frames as PNG/JPEG/WebP files"
    Options = FramesOptions

    @property
    def ext(self) -> str:
        return {"png": "png", "jpeg": "jpg", "webp": "webp"}[self.options.format]

    def encode(self, result, buffer) -> None:
        if self.options.format == "png":
            PngWriter.encode(self, result, buffer)
        else:
            self.format = self.options.format.upper()
            JpegWriter.encode(self, result, buffer)


@dataclass
class VideoOptions:
    format: Literal["mp4", "webm", "gif", "webp"] = "mp4"
    fps: float | None = field(default=None, metadata={"min": 0.1, "max": 240.0, "help": "default: the animation's fps"})
    quality: int = field(default=18, metadata={"min": 0, "max": 51, "help": "x264/vp9 CRF: lower is better"})
    audio: str | None = field(default=None, metadata={"file": True, "help": "an audio file to mux in (mp4/webm)"})
    path: str = field(default="videos/{job}{name}.{ext}", metadata={"help": "fields: {job}, {name}, {ext}"})


class VideoWriter(Writer):
    """One video per animation (per combination of other sweep axes), plus a smoothness report."""

    name = "video"
    description = "mp4 (H.264, yuv420p), webm (VP9), GIF or WebP animation from the frames"
    Options = VideoOptions
    parallel = True  # write() does nothing

    @classmethod
    def check(cls, options, job) -> list[str]:
        problems = check_template(options.path, fields={"job", "name", "ext"})
        if job.plan.timeline is None:
            problems.append("needs an 'animation:' section in the job")
        if not any(writer_class.writes_images for writer_class, _options, _use in job.writers):
            problems.append("needs a writer that keeps the frames (frames, png, jpeg or webp) in outputs")
        if options.audio and options.format in ("gif", "webp"):
            problems.append(f"{options.format} has no audio track; use mp4 or webm")
        elif options.audio:
            problems += filter(None, [audio_problem(options.audio)])
        return problems

    def write(self, result) -> list:
        """Frames are kept by the frame or image writers; the video is built in finish()."""
        return []

    def finish(self, entries) -> list:
        timeline = self.context.job.plan.timeline
        groups = {}
        for entry in sorted(entries, key=lambda e: e.item["extra"]["animation"]["frame"]):
            others = {k: v for k, v in entry.item.get("axes", {}).items() if k != "frame"}
            groups.setdefault(json.dumps(others, sort_keys=True), []).append(entry)
        written = []
        for index, (key, frames) in enumerate(sorted(groups.items())):
            if len(frames) < timeline.frames or not all(e.image_path() for e in frames):
                self.context.notes.setdefault("video", {})[key] = f"skipped: {len(frames)} of {timeline.frames} frames"
                continue
            name = "" if len(groups) == 1 else f"-{index:03d}"
            written += self._write_video(frames, name, key, timeline)
        return written

    def _write_video(self, frames, name: str, key: str, timeline) -> list:
        from PIL import Image

        images = []
        for entry in frames:
            with Image.open(self.context.out.root / entry.image_path()) as image:
                images.append(image.convert("RGB"))
        fps = self.options.fps or timeline.fps
        relpath = self.options.path.format(job=self.context.job_name, name=name, ext=self.options.format)
        encode = _encode_ffmpeg if self.options.format in ("mp4", "webm") else _encode_pillow
        record = self.context.out.write_run_file_via(relpath, lambda temp: encode(temp, images, fps, self.options),
                                                     self.name)
        report = smoothness(images + images[:1] if timeline.loop else images,  # a loop's last step returns to 0
                            [_segment_ends(entry) for entry in frames])
        report["loop"] = timeline.loop
        report.update(frames=len(images), fps=fps, video=relpath, axes=json.loads(key))
        advice = timing_advice(report, timeline)
        if advice:  # printed at the end of the run, and kept in the report
            report["advice"] = advice
            self.context.notes.setdefault("advice", []).append(f"{relpath}: {advice}")
        sidecar = relpath.rsplit(".", 1)[0] + ".smoothness.json"
        self.context.out.write_run_file(sidecar, json.dumps(report, indent=2).encode(), self.name)
        self.context.notes.setdefault("smoothness", {})[relpath] = report
        return [record.path, sidecar]


def _encode_ffmpeg(path, images, fps: float, options: VideoOptions) -> None:
    """H.264 yuv420p mp4 (plays in browsers) or VP9 webm, optionally with an audio track."""
    import imageio_ffmpeg
    import numpy as np

    width, height = images[0].size
    if options.format == "mp4":
        codec, params = "libx264", ["-crf", str(options.quality), "-preset", "medium", "-movflags", "+faststart"]
    else:
        codec, params = "libvpx-vp9", ["-crf", str(options.quality), "-b:v", "0"]
    # yuv420p needs even sides: pad odd sizes by one pixel instead of letting ffmpeg rescale.
    params += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec=codec, quality=None,
                                         macro_block_size=1, output_params=params, audio_path=options.audio,
                                         audio_codec="aac" if options.format == "mp4" else "libopus")
    writer.send(None)
    for image in images:
        writer.send(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)))
    writer.close()


def _encode_pillow(path, images, fps: float, options: VideoOptions) -> None:
    """Looping GIF or animated WebP."""
    duration = max(1, round(1000 / fps))
    extra = {"quality": 90} if options.format == "webp" else {"optimize": False}
    images[0].save(path, format=options.format.upper(), save_all=True, append_images=images[1:],
                   duration=duration, loop=0, **extra)


def _segment_ends(entry) -> tuple | None:
    """(start keyframe's frame, end keyframe's frame) of a frame moving between two, else None."""
    animation = entry.item["extra"]["animation"]
    if not animation.get("t") or "to" not in animation:
        return None
    return animation["from"]["frame"], animation["to"]["frame"]


JUMP = 3.0  # a frame changing over this many times the median change is a jump
DETOUR = 3.0  # mean colour (0-255) off the way between the keyframes that makes a frame a detour


FINE_PROBES = 32  # per segment: every test animation under JUMP, at about one more render of the video


def timing_advice(report: dict, timeline) -> str | None:
    """What to change when a video jumps (its largest change over JUMP x the median); None when it does not."""
    ratio = report.get("max_over_median")
    if not ratio or ratio <= JUMP:
        return None
    frames = ", ".join(map(str, report["jumps"][:5])) + (" ..." if len(report["jumps"]) > 5 else "")
    said = f"its largest frame-to-frame change is {ratio:.1f}x the median (jumps at frames {frames})"
    if timeline.timing != "even":
        return f"{said}; animation.interpolate.timing: even spaces frames by how much the picture changes"
    if (timeline.probes or 0) < FINE_PROBES:
        return (f"{said}; animation.interpolate.probes: {FINE_PROBES} measures the change finer (its pre-pass "
                "costs about one more render of the video)")
    return (f"{said}; the picture snaps faster than {timeline.probes} probes a segment resolve: more probes, more "
            "frames, or a keyframe inside the snap")


def smoothness(images, ends=None) -> dict:
    """Mean absolute pixel change (0-255) between consecutive frames, where it jumps, and detours.

    A detour is a frame with colour that neither of its keyframes has at that place: per pixel and
    channel, |f - A| + |f - B| - |A - B| is 0 anywhere between A and B (a cross-fade never
    detours); half its mean is the frame's ``off_path`` change, and over DETOUR names it.
    """
    import numpy as np

    arrays = [np.asarray(image, dtype=np.float32) for image in images]
    steps = [float(np.abs(b - a).mean()) for a, b in itertools.pairwise(arrays)]
    if not steps:
        return {"mean": 0.0, "median": 0.0, "max": 0.0, "max_over_median": 0.0, "jumps": [], "detours": []}
    median = float(np.median([step for step in steps if step > 0] or steps))  # holds do not move
    jumps = [i + 1 for i, step in enumerate(steps) if median > 0 and step > JUMP * median]
    off_path = [0.0] * len(ends or arrays)
    for frame, pair in enumerate(ends or []):
        if pair is not None and max(pair) < len(arrays):
            a, b = arrays[pair[0]], arrays[pair[1]]
            f = arrays[frame]
            off_path[frame] = float((np.abs(f - a) + np.abs(f - b) - np.abs(a - b)).mean() / 2)
    return {
        "mean": round(float(np.mean(steps)), 4), "median": round(median, 4), "max": round(max(steps), 4),
        "segments": segment_figures(steps, ends or []),
        "max_over_median": round(max(steps) / median, 4) if median > 0 else None,
        "jumps": jumps,  # frames whose change from the previous one is over 3x the median
        "detours": [f for f, off in enumerate(off_path) if off > DETOUR],  # frames far from both keyframes
        "steps": [round(s, 4) for s in steps],
        "off_path": [round(off, 4) for off in off_path],
    }


def segment_figures(steps: list, ends: list) -> list:
    """Max/median change inside each keyframe segment: what timing can even out.

    Across segments the change per frame differs with how far apart the keyframes are,
    which no timing between fixed keyframes changes.
    """
    import numpy as np

    spans: dict = {}
    for frame, pair in enumerate(ends):
        if pair is not None:
            first, last = spans.get(pair, (frame, frame))
            spans[pair] = (min(first, frame), max(last, frame))
    figures = []
    for (start, end), (first, last) in spans.items():
        inside = [step for step in steps[first - 1:last + 1] if step > 0]
        if inside:
            median = float(np.median(inside))
            figures.append({"from": start, "to": end, "max": round(max(inside), 4), "median": round(median, 4),
                            "max_over_median": round(max(inside) / median, 4) if median > 0 else None})
    return figures


@hookimpl(trylast=True)
def register_writers(register):
    """Frame images and videos for animation jobs."""
    register(FramesWriter)
    register(VideoWriter, aliases=("mp4",))
