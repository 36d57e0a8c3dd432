"""Preprocessors behind the ControlNet conditioners: canny, depth (DPT) and pose (ViTPose).

The depth and pose models are tiny random-initialised ones built once per session and
saved in the real formats, so the loading code runs offline. Random weights cannot
be judged on what they predict: the tests check formats, sizes, determinism and the
errors; the scenes' ground truth checks alignment and the depth-ordering rule.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from sdbatch.tiny import scenes
from sdbatch_plugins import preprocessors as pp

SEEDS = range(64)


def _near(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Pixels within `pixels` (chessboard distance) of the mask."""
    import cv2

    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


@pytest.fixture(scope="session")
def tiny_dpt(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    return pp.make_tiny_dpt(tmp_path_factory.mktemp("preprocessors") / "dpt", seed=0)


@pytest.fixture(scope="session")
def tiny_vitpose(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    return pp.make_tiny_vitpose(tmp_path_factory.mktemp("preprocessors") / "vitpose", seed=0)


@pytest.fixture(scope="session")
def depth_estimator(tiny_dpt):
    return pp.load_depth_estimator(str(tiny_dpt))


@pytest.fixture(scope="session")
def pose_estimator(tiny_vitpose):
    return pp.load_pose_estimator(str(tiny_vitpose))


# ---------------------------------------------------------------- module


def test_import_is_cheap():
    """Importing the module must not pull in torch, transformers or OpenCV (sdbatch plan stays fast)."""
    import subprocess
    import sys

    code = ("import sys, sdbatch_plugins.preprocessors; "
            "print(sorted({'torch', 'transformers', 'cv2'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- canny


def test_canny_map_format():
    scene = scenes.make_scene(0)
    edges = pp.canny_map(scene.pil())
    assert edges.mode == "RGB" and edges.size == (scenes.SIZE, scenes.SIZE)
    array = np.asarray(edges)
    assert set(np.unique(array)) <= {0, 255}  # white on black, nothing between
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all()
    assert (array > 0).any()


def test_canny_map_follows_the_scene_edges():
    """Canny's edges lie on the true boundaries (precision), and find most of them (recall).

    Measured on seeds 0-63 with a 1-pixel tolerance: precision 1.00 and recall 0.998 at
    both threshold pairs (Canny on RGB keeps equiluminant pairs such as green on red,
    which greyscale Canny loses: recall was 0.78 that way at 100/200).
    """
    for (low, high), min_recall in (((100, 200), 0.95), ((20, 50), 0.95)):
        hits = found = detected = truth = 0
        for seed in SEEDS:
            scene = scenes.make_scene(seed)
            canny = np.asarray(pp.canny_map(scene.pil(), low, high))[..., 0] > 0
            edges = scene.edges > 0
            hits += (canny & _near(edges, 1)).sum()
            detected += canny.sum()
            found += (edges & _near(canny, 1)).sum()
            truth += edges.sum()
        assert hits / detected >= 0.95, (low, high)
        assert found / truth >= min_recall, (low, high)


def test_canny_map_rejects_inverted_thresholds():
    with pytest.raises(ValueError, match="low <= high"):
        pp.canny_map(scenes.make_scene(0).pil(), low=200, high=100)


# ---------------------------------------------------------------- depth


def test_tiny_models_are_small(tiny_dpt, tiny_vitpose):
    for folder in (tiny_dpt, tiny_vitpose):
        assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
        assert sum(p.stat().st_size for p in folder.iterdir()) < 2_000_000


def test_depth_estimator_from_folder(depth_estimator):
    from transformers import DPTForDepthEstimation

    assert isinstance(depth_estimator.model, DPTForDepthEstimation)
    assert not depth_estimator.model.training
    assert depth_estimator.processor.size == {"height": 64, "width": 64}


def test_depth_estimator_from_single_file(tiny_dpt, depth_estimator, tmp_path):
    """A lone .safetensors with <stem>.json beside it, or with config.json in its folder: same weights."""
    import torch

    for config_name in ("depth.json", "config.json"):
        folder = tmp_path / config_name
        folder.mkdir()
        shutil.copy(tiny_dpt / "model.safetensors", folder / "depth.safetensors")
        shutil.copy(tiny_dpt / "config.json", folder / config_name)
        estimator = pp.load_depth_estimator(str(folder / "depth.safetensors"))
        for (name, a), (_, b) in zip(estimator.model.state_dict().items(), depth_estimator.model.state_dict().items()):
            assert torch.equal(a, b), name
        # No preprocessor_config.json beside the file: the default, at the model's input size.
        assert estimator.processor.size == {"height": 64, "width": 64}
        assert list(estimator.processor.image_mean) == [0.5, 0.5, 0.5]


def test_depth_single_file_without_config(tiny_dpt, tmp_path):
    shutil.copy(tiny_dpt / "model.safetensors", tmp_path / "depth.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json beside it.*depth.json"):
        pp.load_depth_estimator(str(tmp_path / "depth.safetensors"))


def test_depth_refuses_pickle(tiny_dpt, tmp_path):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(tiny_dpt / "model.safetensors"), tmp_path / "depth.bin")
    shutil.copy(tiny_dpt / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        pp.load_depth_estimator(str(tmp_path / "depth.bin"))
    # A folder with only pickle weights is refused the same way.
    (tmp_path / "depth.bin").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        pp.load_depth_estimator(str(tmp_path))
    # Trusted: loads (torch.load with weights_only, still no code from the file).
    (tmp_path / "pytorch_model.bin").rename(tmp_path / "depth.bin")
    estimator = pp.load_depth_estimator(str(tmp_path / "depth.bin"), allow_pickle=True)
    assert not estimator.model.training


def test_depth_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder, a .safetensors file or a hub id"):
        pp.load_depth_estimator(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="depth model file not found"):
        pp.load_depth_estimator(str(tmp_path / "nowhere.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pp.load_depth_estimator(str(tmp_path / "empty"))


def test_depth_refuses_a_pose_model(tiny_vitpose):
    with pytest.raises(ValueError, match="'vitpose' model.*needs a 'dpt'"):
        pp.load_depth_estimator(str(tiny_vitpose))


def test_depth_hub_id_offline_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        pp.load_depth_estimator("nobody/no-such-depth-model")


def test_depth_map_format_and_determinism(depth_estimator):
    image = scenes.make_scene(3).pil().resize((80, 48))  # not square, not the model's size
    first = pp.depth_map(depth_estimator, image)
    second = pp.depth_map(depth_estimator, image)
    assert first.mode == "RGB" and first.size == (80, 48)
    array = np.asarray(first)
    assert array.min() == 0 and array.max() == 255  # min-max normalised
    assert (array[..., 0] == array[..., 2]).all()  # grey
    assert np.array_equal(array, np.asarray(second))


def test_depth_orders_front_on_ground_truth():
    """The ordering rule holds for the scenes' own depth maps and fails when they are inverted."""
    counts = {1: 0, 2: 0}
    for seed in range(24):
        scene = scenes.make_scene(seed)
        truth = Image.fromarray(scene.depth).convert("RGB")  # as depth_map returns it
        assert scenes.depth_orders_front(truth, scene), seed
        assert scenes.depth_orders_front(np.asarray(truth), scene), seed
        assert not scenes.depth_orders_front(Image.fromarray(255 - scene.depth), scene), seed
        counts[len(scene.attributes.shapes)] += 1
    assert counts[1] and counts[2]  # both kinds of scene were checked
    with pytest.raises(ValueError, match="depth map is 32x32"):
        scenes.depth_orders_front(np.zeros((32, 32)), scenes.make_scene(0))


def test_depth_orders_front_accepts_depth_map_output(depth_estimator):
    """The rule runs on what depth_map returns (a trained estimator will be held to it; random weights are not)."""
    scene = scenes.make_scene(1)
    assert isinstance(scenes.depth_orders_front(pp.depth_map(depth_estimator, scene.pil()), scene), bool)


# ---------------------------------------------------------------- pose


def test_make_figure_keypoints_plausible():
    for seed in range(32):
        figure = scenes.make_figure(seed)
        assert figure.image.shape == (64, 64, 3) and figure.image.dtype == np.uint8
        k = figure.keypoints
        assert k.shape == (18, 3) and k.dtype == np.float32
        assert (k[:, 2] == 1).all() and (k[:, :2] >= 0).all() and (k[:, :2] <= 63).all()
        assert np.allclose(k[1, :2], (k[2, :2] + k[5, :2]) / 2, atol=1e-4)  # neck between the shoulders
        assert k[2, 0] < k[5, 0] and k[8, 0] < k[11, 0]  # facing us: its right side on the image's left
        assert k[0, 1] < k[1, 1] < (k[8, 1] + k[11, 1]) / 2  # head above neck above hips
        assert k[16, 0] < k[14, 0] < k[15, 0] < k[17, 0]  # ear, eye, eye, ear
        for a, b, lo, hi in ((2, 3, 4, 12), (8, 9, 6, 16), (9, 10, 6, 16)):  # arm, thigh, shin lengths
            assert lo <= np.hypot(*(k[a, :2] - k[b, :2])) <= hi
        # The figure is drawn where its keypoints are: the image differs from the background there.
        background = figure.image[0, 0].astype(int)
        x, y = np.rint(k[[1, 3, 9, 12], :2]).astype(int).T
        assert (np.abs(figure.image[y, x].astype(int) - background).sum(axis=1) > 60).all()
    assert scenes.make_figure(5).keypoints.tobytes() == scenes.make_figure(5).keypoints.tobytes()


def test_figure_pose_map_matches_draw_pose():
    """scenes draws its own skeleton (core does not import plugins): it must be draw_pose's, pixel for pixel."""
    for seed in range(8):
        figure = scenes.make_figure(seed)
        drawn = pp.draw_pose([figure.keypoints], (64, 64))
        assert np.array_equal(np.asarray(drawn), figure.pose_map)


def test_draw_pose_colours_at_the_keypoints():
    figure = scenes.make_figure(1)
    canvas = np.asarray(pp.draw_pose([figure.keypoints], (64, 64)))
    assert canvas.shape == (64, 64, 3) and (canvas[0, 0] == 0).all()
    x, y = np.rint(figure.keypoints[:, :2]).astype(int).T
    # Every joint is drawn on top in its own OpenPose colour; face points can overlap at 64 px.
    body = [i for i in range(14)]
    matches = [tuple(canvas[y[i], x[i]]) == pp.POSE_COLOURS[i] for i in body]
    assert sum(matches) >= 13
    # Limbs: the midpoint of each arm and leg bone is coloured (60% of the limb's colour).
    for limb in (2, 3, 4, 5, 7, 8, 10, 11):
        a, b = pp.POSE_LIMBS[limb]
        mx, my = np.rint((figure.keypoints[a, :2] + figure.keypoints[b, :2]) / 2).astype(int)
        assert canvas[my, mx].sum() > 0, limb
    colours = {tuple(c) for c in canvas.reshape(-1, 3)} - {(0, 0, 0)}
    assert len(colours) >= 15  # many limbs, many colours


def test_draw_pose_skips_low_scores_and_scales():
    person = scenes.make_figure(2).keypoints.copy()
    person[4, 2] = 0.1  # right wrist unsure: neither the dot nor the forearm is drawn
    canvas = np.asarray(pp.draw_pose([person], (64, 64)))
    x, y = np.rint(person[4, :2]).astype(int)
    assert (canvas[y, x] == 0).all()
    assert not (canvas == np.array(pp.POSE_COLOURS[4])).all(axis=-1).any()
    # Sticks are OpenPose's 4 px (a limb 9 px across) at 512, scaled down to 1 px at 64.
    for size, across in ((512, 9), (64, 3)):
        limb = np.zeros((18, 3), np.float32)
        limb[1], limb[2] = (0.2 * size, size / 2, 1.0), (0.6 * size, size / 2, 1.0)  # neck, right shoulder
        column = np.asarray(pp.draw_pose([limb], (size, size)))[:, int(0.4 * size)]
        assert (column.sum(-1) > 0).sum() == across, size
    with pytest.raises(ValueError, match=r"\(18, 3\)"):
        pp.draw_pose([person[:17]], (64, 64))


def test_pose_estimator_from_folder(pose_estimator):
    from transformers import VitPoseForPoseEstimation

    assert isinstance(pose_estimator.model, VitPoseForPoseEstimation)
    assert pose_estimator.model.config.num_labels == 17


def test_pose_keypoints_format(pose_estimator):
    figure = scenes.make_figure(0)
    people = pp.pose_keypoints(pose_estimator, figure.pil(), threshold=0.0)
    assert isinstance(people, list) and len(people) == 1
    person = people[0]
    assert person.shape == (18, 3) and person.dtype == np.float32
    assert np.allclose(person[1, :2], (person[2, :2] + person[5, :2]) / 2, atol=1e-4)
    assert person[1, 2] == min(person[2, 2], person[5, 2])
    # Image coordinates: random weights can land anywhere, but within the box padded 1.25x.
    assert (person[:, :2] > -0.5 * 64).all() and (person[:, :2] < 1.5 * 64).all()
    again = pp.pose_keypoints(pose_estimator, figure.pil(), threshold=0.0)
    assert np.array_equal(person, again[0])
    # Two boxes, two people; coordinates follow the box.
    two = pp.pose_keypoints(pose_estimator, figure.pil(), threshold=0.0, boxes=[(0, 0, 32, 64), (32, 0, 32, 64)])
    assert len(two) == 2


def test_pose_keypoints_no_person(pose_estimator):
    with pytest.raises(pp.NoPersonFound, match=r"best keypoint score is [\d.]+, under the threshold 1.01"):
        pp.pose_keypoints(pose_estimator, scenes.make_figure(0).pil(), threshold=1.01)


def test_pose_estimator_from_single_file(tiny_vitpose, pose_estimator, tmp_path):
    import torch

    shutil.copy(tiny_vitpose / "model.safetensors", tmp_path / "pose.safetensors")
    shutil.copy(tiny_vitpose / "config.json", tmp_path / "pose.json")
    estimator = pp.load_pose_estimator(str(tmp_path / "pose.safetensors"))
    image = scenes.make_figure(3).pil()
    assert torch.equal(estimator.model.head.conv.weight, pose_estimator.model.head.conv.weight)
    # The default processor has the backbone's input size, like the saved one.
    a = pp.pose_keypoints(estimator, image, threshold=0.0)[0]
    b = pp.pose_keypoints(pose_estimator, image, threshold=0.0)[0]
    assert np.allclose(a, b, atol=1e-4)
