"""Animations: easing, interpolation math, schedules, keyframe frames, video files, resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from sdbatch.errors import JobError
from sdbatch.job import load_job
from sdbatch.latents import EASINGS, easing, lerp, slerp
from sdbatch.schedules import Schedule, ScheduleError


# ---------------------------------------------------------------- easing and interpolation
@pytest.mark.parametrize("name", list(EASINGS) + ["cubic-bezier(0.42, 0, 0.58, 1)", "cubic-bezier(0.1, 0.9, 0.2, 1)"])
def test_easings_are_monotone_from_0_to_1(name):
    ease = easing(name)
    assert ease(0.0) == pytest.approx(0.0, abs=1e-9) and ease(1.0) == pytest.approx(1.0, abs=1e-9)
    values = [ease(i / 200) for i in range(201)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))


def test_unknown_easing_and_bad_bezier_are_refused():
    with pytest.raises(ValueError, match="unknown easing"):
        easing("bounce")
    with pytest.raises(ValueError, match="x1 and x2"):
        easing("cubic-bezier(1.5, 0, 0.5, 1)")


def test_slerp_keeps_the_norm_where_lerp_loses_it():
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 32, 32, generator=g), torch.randn(4, 32, 32, generator=g)
    for t in (0.25, 0.5, 0.75):
        ratio_slerp = float(slerp(a, b, t).norm() / a.norm())
        ratio_lerp = float(lerp(a, b, t).norm() / a.norm())
        assert ratio_slerp == pytest.approx(1.0, abs=0.03)
        assert ratio_lerp < 0.85  # variance (1-t)^2 + t^2: 0.707 at t = 0.5
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    assert torch.allclose(slerp(a, a * 2, 0.5), lerp(a, a * 2, 0.5))  # parallel: falls back to lerp


# ---------------------------------------------------------------- schedules
def test_deforum_schedule_semantics():
    assert Schedule.parse("0:(7.5), 4:(12), 8:(7.5)").values(10) == [7.5, 8.625, 9.75, 10.875, 12.0,
                                                                     10.875, 9.75, 8.625, 7.5, 7.5]
    values = Schedule.parse("0:(1), 5:(t*2)").values(8)
    assert values[5:] == [10.0, 12.0, 14.0]  # an expression holds from its keyframe on, with t the frame
    assert values[:5] == pytest.approx([1.0, 2.8, 4.6, 6.4, 8.2])  # numbers interpolate towards it
    assert Schedule.parse("0:(max_f - t)").values(4) == [3.0, 2.0, 1.0, 0.0]
    assert Schedule.parse("0:(where(t < 2, 1, 5))").values(4) == [1.0, 1.0, 5.0, 5.0]
    assert Schedule.parse(3.5).values(3) == [3.5, 3.5, 3.5]


@pytest.mark.parametrize("text, message", [
    ("0:(7.5", "unbalanced"),
    ("0:(__import__('os').system('x'))", "not allowed|unknown function"),
    ("0:(x + 1)", "unknown name 'x'"),
    ("0:(9**9**9)", "too large"),
    ("0:(1/0)", "division by zero"),
    ("0:(1), 0:(2)", "appears twice"),
    ("zero:(1)", "not a frame number"),
    ("0:(1) 5:(2)", "expected ','"),
])
def test_bad_schedules_are_refused(text, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule.parse(text).values(10)


def _animation_job(write_job, tiny_model, schedules='{guidance: "0:(7.5), 4:(12), 8:(7.5)"}', extra=""):
    return write_job(f"""
        model: {tiny_model}
        sampler: DDIM
        steps: 3
        animation:
          fps: 8
          keyframes:
            0: {{prompt: "a red circle on a blue background", seed: 1}}
            4: {{prompt: "a green square on a blue background", seed: 2}}
            8: {{prompt: "a yellow triangle on a black background", easing: cosine}}
          interpolate: {{embeddings: slerp, noise: slerp, easing: ease-in-out}}
          schedules: {schedules}
        outputs: [{{video: {{format: mp4}}}}, {{frames: {{format: png}}}}]
        {extra}
    """)


def test_bad_schedule_expression_points_at_its_yaml_line(write_job, tiny_model, registry):
    path = _animation_job(write_job, tiny_model, schedules='{guidance: "0:(7.5), 4:(sin(t)+)"}')
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    text = str(error.value)
    line = next(i for i, row in enumerate(path.read_text().splitlines(), 1) if "schedules:" in row)
    assert f"{path}:{line}:" in text and "animation.schedules.guidance" in text and "bad expression" in text


def test_animation_validation_errors(write_job, tiny_model, registry):
    path = write_job(f"""
        model: {tiny_model}
        sweep: {{seed: [1, 2]}}
        animation:
          keyframes:
            3: {{prompt: "a red circle"}}
            x: {{prompt: "a blue circle"}}
          interpolate: {{easing: bouncy}}
          schedules: {{sampler: "0:(1)", guidance: "0:(500)"}}
        outputs: [video]
    """)
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    text = str(error.value)
    for expected in ["sweep.seed: 'seed' comes from the animation's keyframes",
                     "the first keyframe must be at frame 0", "keyframe keys are frame numbers",
                     "unknown easing 'bouncy'", "'sampler' is not a numeric parameter",
                     "gives 500 at frame 0", "needs a writer that keeps the frames"]:
        assert expected in text


def test_frames_are_plan_items_with_their_keyframe_neighbours(write_job, tiny_model, registry):
    job = load_job(_animation_job(write_job, tiny_model), registry)
    frames = list(job.plan)
    assert len(frames) == 9 and [f.extra["animation"]["frame"] for f in frames] == list(range(9))
    middle = frames[2].extra["animation"]
    assert middle["from"]["seed"] == 1 and middle["to"]["seed"] == 2 and 0 < middle["t"] < 1
    assert middle["t"] == pytest.approx(easing("ease-in-out")(0.5))
    assert frames[6].extra["animation"]["t"] == pytest.approx(easing("cosine")(0.5))  # the segment's own easing
    assert frames[8].seed == 2  # a keyframe without a seed keeps the previous one
    assert [f.guidance for f in frames[:5]] == [7.5, 8.625, 9.75, 10.875, 12.0]
    assert frames[4].extra["animation"] == {"frame": 4, "t": 0.0, "from": frames[4].extra["animation"]["from"]}


# ---------------------------------------------------------------- rendering
@pytest.mark.slow
def test_a_keyframe_frame_is_bit_identical_to_the_still(write_job, tiny_model, registry):
    from sdbatch.render import Renderer

    job = load_job(_animation_job(write_job, tiny_model), registry)
    frame = job.plan.item_at(4)
    still_job = load_job(write_job(f"""
        model: {tiny_model}
        sampler: DDIM
        steps: 3
        prompt: "a green square on a blue background"
        seed: 2
        guidance: 12
    """, "still.yaml"), registry)
    renderer = Renderer(registry, "cpu", "float32", {**job.plan.models, **still_job.plan.models})
    between = job.plan.item_at(3)
    animated = renderer.render([frame, between])
    still = renderer.render([still_job.plan.item_at(0)])[0]
    assert np.array_equal(np.asarray(animated[0].image), np.asarray(still.image))
    assert not np.array_equal(np.asarray(animated[1].image), np.asarray(still.image))


def _run(job, out, *extra):
    return subprocess.run([sys.executable, "-m", "sdbatch", "run", str(job), "-o", str(out), "-q", *extra],
                          capture_output=True, text=True, timeout=300)


def _frames(out):
    return {p.name: p.read_bytes() for p in sorted((out / "frames").rglob("*.png"))}


@pytest.mark.slow
def test_video_decodes_and_a_killed_animation_resumes_to_the_same_frames(write_job, tiny_model, tmp_path,
                                                                         kill_run_after):
    import imageio_ffmpeg

    job = _animation_job(write_job, tiny_model)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    result = _run(job, clean)
    assert result.returncode == 0, result.stderr

    reader = imageio_ffmpeg.read_frames(str(clean / "videos" / "job.mp4"))
    meta = next(reader)
    assert meta["fps"] == 8 and tuple(meta["size"]) == (64, 64) and sum(1 for _ in reader) == 9
    summary = json.loads((clean / "summary.json").read_text())
    smooth = summary["notes"]["smoothness"]["videos/job.mp4"]
    assert smooth["frames"] == 9 and len(smooth["steps"]) == 8 and smooth["mean"] > 0
    assert json.loads((clean / "videos" / "job.smoothness.json").read_text())["mean"] == smooth["mean"]

    assert 3 <= kill_run_after(job, killed, finished=3) < 9
    assert not (killed / "videos" / "job.mp4").exists()  # never a partial video under the final name
    result = _run(job, killed)
    assert result.returncode == 0, result.stderr
    assert _frames(killed) == _frames(clean)
    assert (killed / "videos" / "job.mp4").is_file()
    # even timing (the default): the pre-pass ran once per folder, and the frames sit where it says
    curves = lambda out: {key: (curve["t"], curve["change"])  # noqa: E731 - what the plan reads (not seconds)
                          for key, curve in json.loads((out / "timing.json").read_text())["segments"].items()}
    assert curves(clean) == curves(killed) and len(curves(clean)) == 2
    manifest = [json.loads(line)["item"]["extra"]["animation"] for line in (clean / "manifest.jsonl").open()]
    assert {a.get("timing") for a in manifest} == {None, "even"}
    result = _run(job, tmp_path / "single", "--batch-size", "1")
    assert result.returncode == 0, result.stderr
    assert _frames(tmp_path / "single") == _frames(clean)  # probes and frames never depend on the batch


# ---------------------------------------------------------------- image keyframes and audio
@pytest.mark.slow
def test_image_keyframes_render_and_their_content_is_in_the_item_id(write_job, tiny_model, registry, tmp_path):
    from PIL import Image

    from sdbatch.cli import main

    source = tmp_path / "start.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(source)
    path = write_job(f"""
        model: {tiny_model}
        sampler: DDIM
        steps: 3
        guidance: 1
        animation:
          keyframes:
            0: {{image: start.png, prompt: "a red square"}}
            3: {{prompt: "a blue circle", seed: 5}}
        outputs: [frames, {{video: {{format: webp}}}}]
    """)
    first = load_job(path, registry).plan.item_at(0)
    assert first.extra["animation"]["from"]["image_sha256"]
    assert main(["run", str(path), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert len(list((tmp_path / "out" / "frames").rglob("*.png"))) == 4
    with Image.open(tmp_path / "out" / "videos" / "job.webp") as video:
        assert video.n_frames == 4
    Image.new("RGB", (64, 64), (20, 30, 200)).save(source)
    assert load_job(path, registry).plan.item_at(0).id != first.id


@pytest.mark.slow
def test_video_with_an_audio_track(write_job, tiny_model, tmp_path):
    import wave

    import imageio_ffmpeg

    from sdbatch.cli import main

    with wave.open(str(tmp_path / "tone.wav"), "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(8000)
        samples = (np.sin(np.arange(8000) * 2 * np.pi * 440 / 8000) * 8000).astype("<i2")
        audio.writeframes(samples.tobytes())
    path = write_job(f"""
        model: {tiny_model}
        steps: 2
        animation:
          fps: 4
          keyframes: {{0: {{prompt: "a red circle", seed: 1}}, 3: {{prompt: "a blue circle", seed: 2}}}}
        outputs: [frames, {{video: {{format: mp4, audio: tone.wav}}}}]
    """)
    assert main(["run", str(path), "-o", str(tmp_path / "out"), "-q"]) == 0
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i",
                            str(tmp_path / "out" / "videos" / "job.mp4")], capture_output=True, text=True)
    assert "Video: h264" in probe.stderr and "Audio: aac" in probe.stderr


# ---------------------------------------------------------------- even timing, holds, loops
def _timeline(**options):
    from sdbatch.animation import Keyframe, Timeline

    keyframes = [Keyframe(0, "a red circle", "", 1, hold=options.pop("hold", 0)), Keyframe(8, "a blue square", "", 2)]
    return Timeline(keyframes, **options)


def test_position_for_inverts_the_cumulative_change():
    from sdbatch.animation import position_for

    curve = {"t": [0.0, 0.5, 0.75, 1.0], "change": [0.0, 0.1, 0.9, 1.0]}  # most change between t 0.5 and 0.75
    assert position_for(curve, 0.05) == pytest.approx(0.25)
    assert position_for(curve, 0.5) == pytest.approx(0.625)
    assert position_for(curve, 0.95) == pytest.approx(0.875)
    assert position_for(curve, 0.0) == 0.0 and position_for(curve, 1.0) == 1.0
    flat = {"t": [0.0, 0.5, 1.0], "change": [0.0, 0.0, 1.0]}  # nothing changes before t 0.5
    assert position_for(flat, 0.5) == pytest.approx(0.75)


def test_even_frames_are_provisional_until_a_curve_is_loaded_then_follow_it():
    timeline = _timeline(timing="even", easing="ease-in-out")
    provisional = timeline.frame(2, lambda segment: "key")["animation"]
    assert provisional["timing"] == "provisional" and provisional["t"] == pytest.approx(easing("ease-in-out")(0.25))
    timeline.curves = {"key": {"t": [0.0, 0.5, 0.75, 1.0], "change": [0.0, 0.1, 0.9, 1.0]}}
    for f in range(1, 8):
        animation = timeline.frame(f, lambda segment: "key")["animation"]
        from sdbatch.animation import position_for

        # easing applies on top: frame f sits where ease(f/8) of the change has happened
        assert animation["timing"] == "even"
        assert animation["t"] == position_for(timeline.curves["key"], easing("ease-in-out")(f / 8))
    assert "timing" not in timeline.frame(0, lambda segment: "key")["animation"]  # keyframes stay stills
    # uniform: the item is as it always was (these keys, so the same ids and files as before even timing)
    assert set(_timeline().frame(3)["animation"]) == {"frame", "t", "from", "to", "embeddings", "noise"}
    assert set(_timeline().frame(3)["animation"]["from"]) == {"frame", "prompt", "negative_prompt", "seed"}


def test_holds_and_loops_plan_their_frames():
    held = _timeline(hold=3)
    assert held.frames == 9
    assert [held.frame(f)["animation"]["t"] for f in range(4)] == [0.0] * 4  # frames 0-3 show keyframe 0
    assert held.frame(4)["animation"]["t"] == pytest.approx(0.2)  # then 5 steps from frame 3 to frame 8
    looped = _timeline(loop=True)
    assert looped.frames == 16  # 8 out, 8 back; frame 16 would be frame 0 again
    back = looped.frame(12)["animation"]
    assert back["from"]["frame"] == 8 and back["to"]["frame"] == 0 and back["t"] == pytest.approx(0.5)
    assert looped.frame(12)["fields"]["seed"] == 2


def test_hold_and_loop_validation(write_job, tiny_model, registry):
    path = write_job(f"""
        model: {tiny_model}
        animation:
          loop: true
          keyframes:
            0: {{prompt: "a red circle", hold: 4}}
        outputs: [frames]
    """)
    with pytest.raises(JobError, match="a loop needs at least two keyframes"):
        load_job(path, registry)
    path = write_job(f"""
        model: {tiny_model}
        animation:
          keyframes:
            0: {{prompt: "a red circle", hold: 4}}
            4: {{prompt: "a blue circle"}}
        outputs: [frames]
    """)
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    assert f"{path}:4:" in str(error.value) and "holds to frame 4, but the next keyframe is at frame 4" in str(error.value)


class _Picture:
    """A fake rendered result: a grey picture whose level is a steep function of t (a snap near t = 0.6)."""

    def __init__(self, t):
        from PIL import Image

        level = 255 / (1 + np.exp(-(t - 0.6) * 40))
        self.image = Image.new("RGB", (16, 16), (int(level),) * 3)


def test_the_pre_pass_bisects_where_the_picture_changes_and_evens_the_frames(write_job, tiny_model, registry,
                                                                              tmp_path, capsys):
    from sdbatch.timing import BUDGET, TIMING_FILE, load_timing, measure_timing

    path = write_job(f"""
        model: {tiny_model}
        steps: 3
        animation:
          keyframes: {{0: {{prompt: "a red circle", seed: 1}}, 40: {{prompt: "a blue square", seed: 2}}}}
          schedules: {{guidance: "0:(7), 40:(8)"}}  # per-frame guidance: probes are not candidate frames
        outputs: [frames]
    """)
    job = load_job(path, registry)
    rendered = []

    def render(batches):
        rendered.extend(item for batch in batches for item in batch)
        return [_Picture(item.extra["animation"]["t"]) for batch in batches for item in batch]

    report, _ = measure_timing(job.plan, tmp_path, render, len(job.plan), batch_size=4)
    assert report["segments_measured"] == 1 and (tmp_path / TIMING_FILE).is_file()
    assert all(item.steps == 3 and item.width == 64 for item in rendered)  # probes are faithful: the frames' settings
    assert len(rendered) == int(BUDGET * 40) + 1  # the budget: about a quarter of the frames (plus t = 0)
    curve = next(iter(job.plan.timeline.curves.values()))
    ts = curve["t"]
    assert len([t for t in ts if 0.5 < t < 0.75]) >= 3 > len([t for t in ts if t < 0.5])  # bisected at the snap
    level = lambda t: 255 / (1 + np.exp(-(t - 0.6) * 40))  # noqa: E731
    frames = list(job.plan)
    changes = np.diff([level(f.extra["animation"]["t"]) for f in frames[:-1]] + [255.0])
    uniform = np.diff([level(i / 40) for i in range(41)])
    assert changes.max() / np.median(changes) < 3 < uniform.max() / np.median(uniform)
    assert all(f.extra["animation"].get("timing") in (None, "even") for f in frames)

    count = len(rendered)
    again = load_job(path, registry)
    assert measure_timing(again.plan, tmp_path, render, len(again.plan), 4)[0]["segments_measured"] == 0
    assert len(rendered) == count and [f.id for f in again.plan] == [f.id for f in frames]  # read, not re-measured
    fresh = load_job(path, registry)
    load_timing(fresh.plan, tmp_path)
    assert [f.id for f in fresh.plan] == [f.id for f in frames]

    from sdbatch.cli import main

    capsys.readouterr()
    assert main(["plan", str(path), "-o", str(tmp_path)]) == 0  # the plan as run will render it
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [f.id for f in frames]
    assert main(["plan", str(path), "--limit", "2"]) == 0
    shown = capsys.readouterr()
    assert "provisional" in shown.err and json.loads(shown.out.splitlines()[1])["extra"]["animation"]["timing"] \
        == "provisional"
    assert main(["validate", str(path)]) == 0 and "frames are provisional" in capsys.readouterr().out


def test_a_video_that_jumps_says_what_to_change(write_job, tmp_path, capsys):
    from types import SimpleNamespace

    from plugins.video import FINE_PROBES, timing_advice
    from sdbatch.cli import main

    report = {"max_over_median": 4.2, "jumps": [3, 9, 12, 15, 20, 31]}
    uniform, default, fine = (SimpleNamespace(timing=timing, probes=probes) for timing, probes in
                              (("uniform", None), ("even", None), ("even", FINE_PROBES)))
    assert "4.2x the median (jumps at frames 3, 9, 12, 15, 20 ...)" in timing_advice(report, uniform)
    assert "timing: even" in timing_advice(report, uniform)
    assert f"probes: {FINE_PROBES}" in timing_advice(report, default)
    assert "snaps faster than" in timing_advice(report, fine)
    assert timing_advice({"max_over_median": 2.9, "jumps": []}, uniform) is None

    job = write_job("""
        model: sdbatch-tiny
        sampler: DDIM
        steps: 6
        animation:
          keyframes:
            0:  {prompt: "a large blue square in the centre, on a white background", seed: 3}
            12: {prompt: "a large red circle in the centre, on a white background", seed: 4}
            24: {prompt: "a large purple triangle in the centre, on a yellow background", seed: 5}
          interpolate: {timing: uniform}
        outputs: [frames, {video: {format: gif}}]
    """)
    assert main(["run", str(job), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    report = json.loads(next((tmp_path / "out" / "videos").glob("*.smoothness.json")).read_text())
    assert report["max_over_median"] > 3  # uniform timing on sdbatch-tiny: it idles, then snaps
    assert "timing: even" in report["advice"] and f"sdbatch: {report['video']}: {report['advice']}" in err


def test_smoothness_names_jumps_and_detours():
    from PIL import Image, ImageDraw

    from plugins.video import smoothness

    def picture(background, shape, fill):
        image = Image.new("RGB", (32, 32), background)
        draw = ImageDraw.Draw(image)
        (draw.rectangle if shape == "square" else draw.ellipse)((8, 8, 24, 24), fill=fill)
        return image

    start, end = picture("blue", "square", "green"), picture("black", "circle", "yellow")
    fade = Image.blend(start, end, 0.5)  # on the way from start to end everywhere
    red = picture("blue", "square", "red")  # neither keyframe is red there
    report = smoothness([start, fade, red, end], [None, (0, 3), (0, 3), None])
    assert report["detours"] == [2] and report["off_path"][1] == 0.0 and report["off_path"][2] > 3
    assert [(s["from"], s["to"]) for s in report["segments"]] == [(0, 3)]
    assert report["segments"][0]["max"] == report["max"]
    still = smoothness([start, start, start, end, end], None)  # a hold does not make the median 0
    assert still["median"] > 0 and still["jumps"] == []


EVEN_PAIRS = {  # keyframes 0, 24, 48 of sdbatch-tiny scenes: (prompt, seed) each
    "square-circle-triangle": [("a large blue square in the centre, on a white background", 3),
                               ("a large red circle in the centre, on a white background", 4),
                               ("a large purple triangle in the centre, on a yellow background", 5)],
    "circle-square-circle": [("a large green circle in the centre, on a black background", 7),
                             ("a large yellow square in the centre, on a blue background", 8),
                             ("a large red circle in the centre, on a white background", 9)],
    "triangle-circle-square": [("a large yellow triangle in the centre, on a blue background", 11),
                               ("a large green circle in the centre, on a white background", 12),
                               ("a large red square in the centre, on a black background", 13)],
    "square-triangle-circle": [("a large purple square in the centre, on a white background", 21),
                               ("a large blue triangle in the centre, on a yellow background", 22),
                               ("a large yellow circle in the centre, on a blue background", 23)],
}


# Whole-video max/median with even timing spread over the video, measured at 6 steps (uniform in brackets), with
# frames chosen among candidates (the default here: linear easing, no per-frame schedule): square-circle-triangle
# 1.44 (18.97), circle-square-circle 1.84 (7.23), triangle-circle-square 1.42 (9.12), square-triangle-circle 2.34
# (13.33), each from 58 candidates and one more frame (59 pictures where uniform timing renders 49). Probes apart
# from frames (timing.py's rounds, the default when a schedule varies per frame) measured 2.89, 3.60, 3.69 and 3.93
# at 6 per segment; with `probes: 32` (about the render's own cost) 1.43, 1.47, 1.19, 1.19.


@pytest.mark.slow
@pytest.mark.parametrize("pairs", list(EVEN_PAIRS))
def test_even_timing_spread_over_the_video_moves_evenly_on_sdbatch_tiny(pairs, write_job, registry, tmp_path):
    """Uniform against even timing spread over the video, in the same test (the issue's target: <= 3)."""
    from plugins.video import FINE_PROBES  # the probes its advice names: the target holds on all four
    from sdbatch.run import LocalExecutor

    keyframes = "\n".join(f"    {frame}: {{prompt: \"{prompt}\", seed: {seed}}}"
                           for frame, (prompt, seed) in zip((0, 24, 48), EVEN_PAIRS[pairs]))

    def run(interpolate):
        path = write_job(f"""
sampler: DDIM
steps: 6
batch_size: 8
animation:
  keyframes:
{keyframes}
  interpolate: {interpolate}
outputs: [frames, {{video: {{format: gif}}}}]
""", "job.yaml")
        out = tmp_path / interpolate.replace(" ", "").replace(",", "-").strip("{}").replace(":", "")
        summary = LocalExecutor(load_job(path, registry), registry, out, quiet=True).run()
        return summary, next(iter(summary.notes["smoothness"].values()))

    _, uniform = run("{timing: uniform}")
    summary, even = run("{timing: even, spread: video}")
    fine_summary, fine = run(f"{{timing: even, spread: video, probes: {FINE_PROBES}}}")
    print(f"{pairs}: max/median uniform {uniform['max_over_median']}, even over the video {even['max_over_median']} "
          f"(segments {[(s['from'], s['to'], s['max_over_median']) for s in even['segments']]}), "
          f"with {FINE_PROBES} probes {fine['max_over_median']}")
    assert even["max_over_median"] <= 3 < uniform["max_over_median"]
    timing = summary.notes["timing"]
    assert timing["frames_from_candidates"] == 49  # every frame: the pre-pass rendered them
    assert timing["pictures"] <= 1.2 * 49  # pictures rendered in all, against uniform timing's 49
    assert fine["max_over_median"] <= 3 and fine_summary.notes["timing"]["probes"] <= 2 * FINE_PROBES
    assert "timing: even" in uniform["advice"] and "advice" not in fine  # what to change, only where it jumps
    assert "advice" not in even


# ---------------------------------------------------------------- spread: video
def test_apportion_and_spread_keyframes():
    from sdbatch.animation import Keyframe, apportion, spread_keyframes

    assert apportion(48, [25.2, 120.3]) == [8, 40]  # the example's two segments (mean |RGB| change)
    assert apportion(5, [1, 1, 1]) == [2, 2, 1] and sum(apportion(7, [0.0, 0.0])) == 7  # ties: the earlier
    assert apportion(10, [0.0, 100.0]) == [1, 9]  # every segment keeps a frame
    kf = [Keyframe(0, "a", "", 1, hold=2), Keyframe(20, "b", "", 2, hold=4), Keyframe(30, "c", "", 3, pin=True),
          Keyframe(50, "d", "", 4), Keyframe(60, "e", "", 5)]
    placed = spread_keyframes(kf, [1.0, 3.0, 1.0, 1.0])
    # 0 -> 30 (pinned): 30 frames less holds 2 + 4 leave 24 moving frames, shared 6 : 18
    assert [k.frame for k in placed] == [0, 2 + 6, 30, 45, 60]  # then 30 frames, 15 : 15
    assert [(k.prompt, k.hold, k.pin) for k in placed] == [(k.prompt, k.hold, k.pin) for k in kf]


def _spread_job(write_job, tiny_model, spread="video", pin="", steps=3, probes=None, candidates=False):
    """Without ``candidates`` a per-frame guidance schedule keeps probes apart from frames (probes only)."""
    schedule = "" if candidates else 'schedules: {guidance: "0:(7), 40:(8)"}'
    return write_job(f"""
        model: {tiny_model}
        sampler: DDIM
        steps: {steps}
        animation:
          keyframes:
            0:  {{prompt: "a red circle", seed: 1}}
            20: {{prompt: "a blue square", seed: 2{pin}}}
            40: {{prompt: "a green triangle", seed: 3}}
          interpolate: {{timing: even, spread: {spread}{f", probes: {probes}" if probes else ""}}}
          {schedule}
        outputs: [frames]
    """, f"spread-{spread}{'-pinned' if pin else ''}{f'-probes{probes}' if probes else ''}"
       f"{'-candidates' if candidates else ''}.yaml")


def _level(item):
    """A fake picture's grey level: 0 -> 20 -> 240 over the keyframes, the second segment snapping near t 0.6."""
    animation = item.extra["animation"]
    t, start = animation["t"], animation["from"]["seed"]
    snap = lambda x: 1 / (1 + np.exp(-(x - 0.6) * 12))  # noqa: E731
    return {1: 20 * t, 2: 20 + 220 * (snap(t) - snap(0)) / (snap(1) - snap(0)), 3: 240.0}[start]


def _fake_render(rendered):
    from PIL import Image

    class Result:
        def __init__(self, item):
            self.image = Image.new("RGB", (16, 16), (int(round(_level(item))),) * 3)

    def render(batches):
        rendered.extend(item for batch in batches for item in batch)
        return [Result(item) for batch in batches for item in batch]

    return render


def _max_over_median(levels):
    steps = np.abs(np.diff(levels))
    return steps.max() / np.median(steps[steps > 0])


def test_spread_video_moves_keyframes_with_the_measured_change(write_job, tiny_model, registry, tmp_path, capsys):
    from sdbatch.cli import main
    from sdbatch.timing import BUDGET, load_timing, measure_timing

    path = _spread_job(write_job, tiny_model)
    job = load_job(path, registry)
    provisional = list(job.plan)
    assert len(provisional) == 41 and provisional[20].extra["animation"]["timing"] == "provisional"  # will move
    assert "timing" not in provisional[0].extra["animation"] and "timing" not in provisional[40].extra["animation"]
    rendered = []
    report, _ = measure_timing(job.plan, tmp_path, _fake_render(rendered), len(job.plan), batch_size=8)
    assert report["segments_measured"] == 2
    frames = list(job.plan)
    starts = [f.extra["animation"]["frame"] for f in frames if f.extra["animation"]["t"] == 0]
    assert len(frames) == 41 and starts[0] == 0 and starts[-1] == 40 and 1 <= starts[1] < 8  # 24 -> ~4
    middle = frames[starts[1]]
    assert middle.prompt == "a blue square" and middle.extra["animation"]["from"]["frame"] == starts[1]
    assert frames[starts[1] + 1].extra["animation"]["from"]["frame"] == starts[1]  # video frames, for detours
    assert all(f.extra["animation"].get("timing") in (None, "even") for f in frames)

    # the group's probes went where its change is: to the second segment (the budget is the two segments')
    counts = [len(curve["t"]) for curve in job.plan.timeline.curves.values()]
    budget = 2 * (int(BUDGET * 20) + 1)
    assert sorted(counts) == [3, budget - 3] and sum(counts) == len(rendered) == budget

    # spread: segment measures each segment alone (other keys); pinning keyframe 20 plans the same frames
    segment = load_job(_spread_job(write_job, tiny_model, spread="segment"), registry)
    again, _ = measure_timing(segment.plan, tmp_path, _fake_render(rendered), len(segment.plan), 8)
    assert again["segments_measured"] == 2
    levels = lambda plan: [_level(f) for f in plan]  # noqa: E731
    assert _max_over_median(levels(job.plan)) <= 3 < _max_over_median(levels(segment.plan))
    pinned = load_job(_spread_job(write_job, tiny_model, pin=", pin: true"), registry)
    report, _ = measure_timing(pinned.plan, tmp_path, _fake_render(rendered), len(pinned.plan), 8)
    assert report["segments_measured"] == 0
    assert [f.id for f in pinned.plan] == [f.id for f in segment.plan]  # nothing left to move

    # resume: a fresh plan reads timing.json and plans the same frames; so does `sdbatch plan -o`
    fresh = load_job(path, registry)
    load_timing(fresh.plan, tmp_path)
    assert [f.id for f in fresh.plan] == [f.id for f in frames]
    capsys.readouterr()
    assert main(["plan", str(path), "-o", str(tmp_path)]) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [f.id for f in frames]


def test_more_probes_resolve_a_snap_finer_under_their_own_curve_keys(write_job, tiny_model, registry, tmp_path):
    from sdbatch.timing import BUDGET, measure_timing

    default = load_job(_spread_job(write_job, tiny_model), registry)
    measure_timing(default.plan, tmp_path / "default", _fake_render([]), len(default.plan), 8)
    rendered = []
    finer = load_job(_spread_job(write_job, tiny_model, probes=16), registry)
    report, _ = measure_timing(finer.plan, tmp_path / "finer", _fake_render(rendered), len(finer.plan), 8)
    assert 2 * (int(BUDGET * 20) + 1) < report["probes"] == len(rendered) <= 2 * 16
    assert not set(finer.plan.timeline.curves) & set(default.plan.timeline.curves)  # a budget of its own
    levels = lambda plan: [_level(f) for f in plan]  # noqa: E731
    assert _max_over_median(levels(finer.plan)) < _max_over_median(levels(default.plan))


def test_frames_are_chosen_among_candidates_and_taken_from_them(write_job, tiny_model, registry, tmp_path):
    """Linear easing, no per-frame schedule: the probes are candidate frames, and the frames are chosen among them."""
    from sdbatch.timing import CANDIDATES_EXTRA, CANDIDATES_FOLDER, Spilled, measure_timing, pixel_key

    job = load_job(_spread_job(write_job, tiny_model, candidates=True), registry)
    rendered = []
    report, reused = measure_timing(job.plan, tmp_path, _fake_render(rendered), len(job.plan), batch_size=8)
    frames = list(job.plan)
    # candidates for the 41 frames and 15% more; the keyframe ending one segment and starting the next renders once
    assert report["probes"] == math.ceil((1 + CANDIDATES_EXTRA) * 41) + 1
    assert report["pictures"] == len(rendered) == report["probes"] - 1 < 1.3 * len(frames)
    assert len({pixel_key(item) for item in rendered}) == len(rendered)
    # every frame is a candidate already rendered, the keyframes' (t = 0 and 1) included
    assert report["frames_from_candidates"] == len(reused) == 41
    assert [result.item.id for result in reused] == [frame.id for frame in frames]
    candidates = {pixel_key(item) for item in rendered}
    assert all(pixel_key(frame) in candidates for frame in frames)
    for result in reused:  # each carries its candidate's picture, kept on disk until written
        assert isinstance(result, Spilled) and result.image.getpixel((0, 0))[0] == int(round(_level(result.item)))
    assert len(list((tmp_path / CANDIDATES_FOLDER).iterdir())) == report["pictures"]
    curves = list(job.plan.timeline.curves.values())
    assert sum(curve["frames"] for curve in curves) == 40 and all(curve["candidates"] > 5 for curve in curves)
    levels = [_level(frame) for frame in frames]
    assert _max_over_median(levels) <= 2  # the snap near t 0.6 of the second segment is spread over frames
    assert all(frame.extra["animation"].get("timing") in (None, "even") for frame in frames)

    again = load_job(_spread_job(write_job, tiny_model, candidates=True), registry)
    report, reused = measure_timing(again.plan, tmp_path, _fake_render(rendered), len(again.plan), 8)
    assert report["segments_measured"] == 0 and reused == []  # read from timing.json: frames render as usual
    assert [frame.id for frame in again.plan] == [frame.id for frame in frames]


def test_an_eased_segment_or_a_users_budget_keeps_probes_apart_from_frames(write_job, tiny_model, registry,
                                                                           tmp_path):
    from sdbatch.timing import measure_timing

    for name, text in {"eased": "interpolate: {timing: even, easing: ease-in-out}",
                       "budget": "interpolate: {timing: even, probes: 5}"}.items():
        job = load_job(write_job(f"""
            model: {tiny_model}
            steps: 2
            animation:
              keyframes: {{0: {{prompt: "a red circle", seed: 1}}, 12: {{prompt: "a blue square", seed: 2}}}}
              {text}
            outputs: [frames]
        """, f"{name}.yaml"), registry)
        report, reused = measure_timing(job.plan, tmp_path / name, _fake_render([]), len(job.plan), 8)
        assert reused == [] and "frames_from_candidates" not in report, name


def test_candidates_cover_holds_and_a_loops_way_back(write_job, tiny_model, registry, tmp_path):
    """A held keyframe's frames and a loop's closing segment (its end is frame 0) come from candidates too."""
    from sdbatch.timing import measure_timing

    job = load_job(write_job(f"""
        model: {tiny_model}
        steps: 2
        animation:
          keyframes: {{0: {{prompt: "a red circle", seed: 1, hold: 3}}, 12: {{prompt: "a blue square", seed: 2}}}}
          interpolate: {{timing: even}}
          loop: true
        outputs: [frames]
    """), registry)
    report, reused = measure_timing(job.plan, tmp_path, _fake_render([]), len(job.plan), 8)
    frames = list(job.plan)
    assert len(frames) == 12 + 9 and report["segments_measured"] == 2
    assert [result.item.id for result in reused] == [frame.id for frame in frames]  # every one, holds included
    assert {result.image.getpixel((0, 0)) for result in reused[:4]} == {reused[0].image.getpixel((0, 0))}


def test_run_says_what_the_pre_pass_does(write_job, tiny_model, tmp_path, capsys):
    from sdbatch.cli import main
    from sdbatch.timing import CANDIDATES_FOLDER

    job = write_job(f"""
        model: {tiny_model}
        steps: 2
        animation:
          keyframes: {{0: {{prompt: "a red circle", seed: 1}}, 6: {{prompt: "a blue square", seed: 2}}}}
        outputs: [frames]
    """)
    assert main(["run", str(job), "-o", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / CANDIDATES_FOLDER).exists()  # written, then removed
    err = capsys.readouterr().err
    assert "even timing: measuring 1 animation segment (candidate frames) before rendering" in err
    assert "7 frames taken from them (saved in timing.json)" in err
    assert main(["run", str(job), "-o", str(tmp_path / "out")]) == 0
    assert "even timing" not in capsys.readouterr().err  # measured already: nothing to say


@pytest.mark.slow
def test_frames_taken_from_candidates_equal_frames_rendered_anew(write_job, registry, tmp_path, kill_run_after):
    """On sdbatch-tiny: a run writes its frames from the pre-pass's candidates; a run given the same timing.json
    renders every frame itself, a killed run resumes, a run at batch size 1 re-batches: the files are the same,
    byte for byte."""
    import shutil

    from sdbatch.run import LocalExecutor

    path = write_job("""
        sampler: DDIM
        steps: 4
        batch_size: 4
        animation:
          keyframes:
            0: {prompt: "a large red circle in the centre, on a blue background", seed: 1}
            24: {prompt: "a large green square in the centre, on a blue background", seed: 2}
          interpolate: {timing: even}
        outputs: [frames]
    """)
    first = LocalExecutor(load_job(path, registry), registry, tmp_path / "first", quiet=True).run()
    assert first.notes["timing"]["frames_from_candidates"] == first.rendered == 25
    (tmp_path / "anew").mkdir()
    shutil.copy(tmp_path / "first" / "timing.json", tmp_path / "anew" / "timing.json")
    anew = LocalExecutor(load_job(path, registry), registry, tmp_path / "anew", quiet=True).run()
    assert anew.notes["timing"]["segments_measured"] == 0 and anew.rendered == 25
    assert _frames(tmp_path / "anew") == _frames(tmp_path / "first") and len(_frames(tmp_path / "first")) == 25

    killed = tmp_path / "killed"
    assert 5 <= kill_run_after(path, killed, finished=5) < 25  # while the candidates' frames are written
    result = _run(path, killed)
    assert result.returncode == 0, result.stderr
    assert _frames(killed) == _frames(tmp_path / "first")
    result = _run(path, tmp_path / "single", "--batch-size", "1")
    assert result.returncode == 0, result.stderr
    assert _frames(tmp_path / "single") == _frames(tmp_path / "first")


@pytest.mark.parametrize("value, message", [("2", "at least 3"), ("300", "at most 257"), ("many", "integer")])
def test_probes_out_of_range_or_without_even_timing_are_refused_at_their_line(value, message, write_job, tiny_model,
                                                                             registry):
    path = write_job(f"""
        model: {tiny_model}
        animation:
          keyframes: {{0: {{prompt: "a red circle"}}, 8: {{prompt: "a blue circle"}}}}
          interpolate:
            probes: {value}
        outputs: [frames]
    """)
    line = next(i for i, row in enumerate(path.read_text().splitlines(), 1) if "probes:" in row)
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    assert f"{path.name}:{line}:" in str(error.value) and "animation.interpolate.probes" in str(error.value)
    assert message in str(error.value)
    path.write_text(path.read_text().replace(f"probes: {value}", "{probes: 8, timing: uniform}").replace(
        "interpolate:\n", "interpolate: "))
    line = next(i for i, row in enumerate(path.read_text().splitlines(), 1) if "probes:" in row)
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    assert f"{path.name}:{line}:" in str(error.value) and "needs timing: even" in str(error.value)


@pytest.mark.parametrize("probes, candidates", [(None, False), (16, False), (None, True)])
def test_probes_do_not_depend_on_the_batch_size(probes, candidates, write_job, tiny_model, registry, tmp_path):
    from sdbatch.timing import measure_timing

    curves = []
    for batch_size in (1, 3, 8):
        job = load_job(_spread_job(write_job, tiny_model, probes=probes, candidates=candidates), registry)
        measure_timing(job.plan, tmp_path / str(batch_size), _fake_render([]), len(job.plan), batch_size)
        curves.append({key: (curve["t"], curve["raw"]) for key, curve in job.plan.timeline.curves.items()})
    assert curves[0] == curves[1] == curves[2]  # rounds are sized by the group's budget, not by batches


def test_spread_and_pin_validation_point_at_their_yaml_lines(write_job, tiny_model, registry):
    path = write_job(f"""
        model: {tiny_model}
        animation:
          keyframes:
            0: {{prompt: "a red circle"}}
            4: {{prompt: "a blue circle",
                 pin: true}}
            8: {{prompt: "a green circle"}}
          interpolate:
            timing: uniform
            spread: video
        outputs: [frames]
    """)
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    text, lines = str(error.value), path.read_text().splitlines()
    line = next(i for i, row in enumerate(lines, 1) if "spread: video" in row)
    assert f"{path.name}:{line}:" in text and "animation.interpolate.spread" in text and "needs timing: even" in text
    path.write_text(path.read_text().replace("spread: video", "spread: segment").replace("uniform", "even"))
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    line = next(i for i, row in enumerate(lines, 1) if "pin: true" in row)
    assert f"{path.name}:{line}:" in str(error.value) and "animation.keyframes[4].pin" in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("candidates", [False, True], ids=["probes", "candidates"])
def test_spread_video_resumes_and_rebatches_to_the_same_frames(candidates, write_job, tiny_model, tmp_path,
                                                               kill_run_after):
    job = _spread_job(write_job, tiny_model, steps=2, candidates=candidates)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    result = _run(job, clean)
    assert result.returncode == 0, result.stderr
    assert 5 <= kill_run_after(job, killed, finished=5) < 41
    result = _run(job, killed)
    assert result.returncode == 0, result.stderr
    assert _frames(killed) == _frames(clean) and len(_frames(clean)) == 41
    result = _run(job, tmp_path / "single", "--batch-size", "1")
    assert result.returncode == 0, result.stderr
    assert _frames(tmp_path / "single") == _frames(clean)  # probes, keyframe places and frames never batch-bound


@pytest.mark.slow
def test_spread_video_frames_match_between_ray_and_local(write_job, tiny_model, registry, tmp_path):
    ray = pytest.importorskip("ray")
    from sdbatch.ray_executor import RayExecutor
    from sdbatch.run import LocalExecutor

    path = write_job(f"""
        model: {tiny_model}
        sampler: DDIM
        steps: 2
        batch_size: 3
        animation:
          keyframes: {{0: {{prompt: "a red circle", seed: 1}}, 4: {{prompt: "a blue square", seed: 2}},
                       8: {{prompt: "a green triangle", seed: 3}}}}
          interpolate: {{timing: even, spread: video}}
        outputs: [frames]
    """)
    LocalExecutor(load_job(path, registry), registry, tmp_path / "local", quiet=True).run()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        RayExecutor(load_job(path, registry), registry, tmp_path / "ray", workers=2, quiet=True).run()
    finally:
        ray.shutdown()
    assert _frames(tmp_path / "ray") == _frames(tmp_path / "local") and len(_frames(tmp_path / "local")) == 9
    manifest = lambda out: sorted(json.loads(line)["id"] for line in (out / "manifest.jsonl").open())  # noqa: E731
    assert manifest(tmp_path / "ray") == manifest(tmp_path / "local")


# ---------------------------------------------------------------- attention interpolation
def test_mixing_attention_interpolates_the_outputs_of_both_prompts_per_row():
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from plugins.animation import MixingAttention

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, processor=AttnProcessor2_0())
    wrapped = MixingAttention(attn.processor)
    x, a, b = torch.randn(3, 5, 8), torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    t = torch.tensor([0.0, 0.25, 1.0])
    plain = lambda context: attn(x, encoder_hidden_states=context)  # noqa: E731
    attn.set_processor(wrapped)
    mixed = attn(x, encoder_hidden_states=a, sdbatch_attention_mix=(b, t))
    assert torch.equal(mixed[0], wrapped.original(attn, x, a)[0])  # t = 0: exactly the first prompt's attention
    attn.set_processor(wrapped.original)
    assert torch.allclose(mixed[1], 0.75 * plain(a)[1] + 0.25 * plain(b)[1], atol=1e-6)
    assert torch.allclose(mixed[2], plain(b)[2], atol=1e-6)
    assert not torch.allclose(mixed[1], plain(0.75 * a + 0.25 * b)[1], atol=1e-4)  # not an embedding lerp
    attn.set_processor(wrapped)
    assert torch.equal(attn(x, encoder_hidden_states=a), wrapped.original(attn, x, a))  # no mix: passed through


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_attention_interpolation_renders_and_leaves_keyframes_alone(family, write_job, tiny_model, registry, request):
    from sdbatch.render import Renderer

    folder = tiny_model if family == "sd1" else request.getfixturevalue("tiny_sdxl")  # SDXL: pooled moves too

    def job(embeddings, guidance):
        return load_job(write_job(f"""
            model: {folder}
            sampler: DDIM
            steps: 3
            guidance: {guidance}
            width: 64
            height: 64
            animation:
              keyframes: {{0: {{prompt: "a red circle", seed: 1}}, 4: {{prompt: "a blue square", seed: 2}}}}
              interpolate: {{embeddings: {embeddings}, timing: uniform}}
            outputs: [frames]
        """, f"{embeddings}-{guidance}.yaml"), registry)

    renderer = None
    for guidance in (7.5, 1.0):  # with classifier-free guidance the batch is doubled: so is the second prompt
        attention, slerp = job("attention", guidance), job("slerp", guidance)
        renderer = renderer or Renderer(registry, "cpu", "float32", attention.plan.models)
        mixed = renderer.render([attention.plan.item_at(4), attention.plan.item_at(2)])
        plain = renderer.render([slerp.plan.item_at(4), slerp.plan.item_at(2)])
        assert attention.plan.item_at(4).id == slerp.plan.item_at(4).id
        assert np.array_equal(np.asarray(mixed[0].image), np.asarray(plain[0].image))  # the keyframe: untouched
        difference = np.abs(np.asarray(mixed[1].image, dtype=float) - np.asarray(plain[1].image, dtype=float))
        assert difference.max() > 0  # another in-between (random weights heed prompts faintly: 0.2 and 0.03 here)


def test_attention_interpolation_is_refused_for_a_model_without_a_unet(write_job, tiny_sd3, registry):
    path = write_job(f"""
        model: {tiny_sd3}
        sampler: Flow Euler
        animation:
          keyframes: {{0: {{prompt: "a red circle"}}, 4: {{prompt: "a blue square"}}}}
          interpolate: {{embeddings: attention}}
        outputs: [frames]
    """)
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    line = next(i for i, row in enumerate(path.read_text().splitlines(), 1) if "embeddings: attention" in row)
    assert f"{path}:{line}:" in str(error.value) and "has joint attention" in str(error.value)
