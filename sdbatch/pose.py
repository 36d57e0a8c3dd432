"""The OpenPose BODY_18 skeleton: keypoint order, limbs, colours and the drawing pose ControlNets expect.

One definition for the pose preprocessor (plugins) and the scene generator's stick
figures (sdbatch.tiny), so a map drawn from ground truth and one drawn from estimated
keypoints are the same pixels. numpy and PIL only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import PIL.Image

# OpenPose BODY_18 keypoint names, in the order pose ControlNets were trained on.
BODY_18 = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)
# OpenPose's limbs as BODY_18 index pairs (0-based) and its 18 colours, as in
# lllyasviel's util.draw_bodypose: only the first 17 pairs are drawn (the two
# shoulder-ear pairs that follow in OpenPose's list are not), limb i in colour i.
POSE_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
POSE_COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
# OpenPose draws 4-pixel sticks and dots on ~512-pixel images; other sizes scale from that.
_POSE_REFERENCE_SIZE = 512
_POSE_STICK = 4


def draw_pose(people: list, size: tuple[int, int], threshold: float = 0.3) -> PIL.Image.Image:
    """The OpenPose skeleton image pose ControlNets expect, ``size`` = (width, height).

    Black background; each of OpenPose's 17 limbs a filled ellipse in its colour at 60%
    (as controlnet_aux draws them), then each joint a dot in its full colour. Keypoints
    are (18, 3) arrays (x, y, score) in BODY_18 order; one under ``threshold`` (or not
    finite) is not drawn, nor any limb that touches it. Stick width and dot radius are
    OpenPose's 4 pixels at 512, scaled with the image (at least 1 pixel).
    """
    from PIL import Image, ImageDraw

    width, height = size
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    stick = max(1.0, _POSE_STICK * min(width, height) / _POSE_REFERENCE_SIZE)
    for person in people:
        person = np.asarray(person, dtype=np.float64)
        if person.shape != (len(BODY_18), 3):
            raise ValueError(f"each person must be an (18, 3) array of x, y, score; got shape {person.shape}")
        shown = np.isfinite(person).all(axis=1) & (person[:, 2] >= threshold)
        for (a, b), colour in zip(POSE_LIMBS, POSE_COLOURS):
            if shown[a] and shown[b]:
                dim = tuple(int(c * 0.6) for c in colour)
                draw.polygon(_limb_polygon(person[a, :2], person[b, :2], stick), fill=dim)
        for (x, y), colour, ok in zip(person[:, :2], POSE_COLOURS, shown):
            if ok:
                # Centred on the joint's pixel: PIL rasterises a fractional 1-pixel disc off-centre.
                x, y, r = round(x), round(y), round(stick)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return canvas


def _limb_polygon(p: np.ndarray, q: np.ndarray, half_width: float, points: int = 36) -> list[tuple[float, float]]:
    """An ellipse from p to q, ``half_width`` thick, as a polygon (OpenPose's limb shape)."""
    centre = (p + q) / 2
    along = q - p
    length = float(np.hypot(*along))
    u = along / length if length > 0 else np.array([1.0, 0.0])
    v = np.array([-u[1], u[0]])
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    ring = centre + np.outer(np.cos(t) * length / 2, u) + np.outer(np.sin(t) * half_width, v)
    return [(float(x), float(y)) for x, y in ring]


