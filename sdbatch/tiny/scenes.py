"""Procedural 64x64 scenes of simple shapes, with captions and ground-truth maps.

Deterministic from a seed, pure numpy + PIL, no torch: the dataset sdbatch-tiny is
trained on, the ground truth its classifier learns from, and the conditioning maps
(edges, depth) later ControlNet work trains on.

    >>> scene = make_scene(seed=7)
    >>> scene.caption
    'a small green triangle at the top, on a purple background'
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
# Shapes are drawn at 4x and box-filtered down: anti-aliased edges like a real render.
_SUPER = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (250, 140, 10),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "blue": (35, 75, 225),
    "purple": (145, 50, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "centre")
SIZES = ("small", "large")

# Centre of a shape for each named position, in pixels.
_CENTRES = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "centre": (32, 32)}
# Half-width of a shape's bounding box, before jitter.
_RADII = {"small": 7.0, "large": 12.5}
# How the position reads in a caption ("on the left", "at the top", "in the centre").
_POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}

# Fraction of scenes with one shape: kept high so one-shape prompts are learned well.
P_SINGLE = 0.7
# Fraction of scenes with a two-tone (top/bottom) background.
P_TWO_TONE = 0.15


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: what it is, its colour, where, how big, and its exact geometry."""

    shape: str
    colour: str
    position: str
    size: str
    cx: float = 32.0
    cy: float = 32.0
    radius: float = 10.0


@dataclass(frozen=True)
class SceneAttributes:
    """Everything a caption is written from. `shapes` is ordered back to front."""

    shapes: tuple[ShapeSpec, ...]
    background: tuple[str, ...]  # one colour (plain) or two (top, bottom)
    overlap: bool = False  # two shapes whose pixels overlap: the last one is in front

    @property
    def front(self) -> ShapeSpec:
        """The nearest shape (the only one in a single-shape scene)."""
        return self.shapes[-1]


@dataclass
class Scene:
    """A rendered scene: uint8 image (H, W, 3), caption, edge map and depth map (H, W)."""

    image: np.ndarray
    attributes: SceneAttributes
    caption: str
    edges: np.ndarray
    depth: np.ndarray
    labels: np.ndarray = field(repr=False)  # per-pixel index: 0 background, k = shapes[k-1]

    def pil(self) -> Image.Image:
        """The image as a PIL RGB image."""
        return Image.fromarray(self.image)


# ---------------------------------------------------------------- captions


def shape_phrase(spec: ShapeSpec) -> str:
    """'a large red circle on the left'."""
    return f"a {spec.size} {spec.colour} {spec.shape} {_POSITION_PHRASE[spec.position]}"


def _article(word: str) -> str:
    """'an' before a vowel ('an orange background'), else 'a'."""
    return "an" if word[0] in "aeiou" else "a"


def background_phrase(background: tuple[str, ...]) -> str:
    """'on a yellow background' or 'on a yellow and blue background'."""
    return f"on {_article(background[0])} {' and '.join(background)} background"


def caption(attrs: SceneAttributes) -> str:
    """Caption written from the attributes; the front shape is named first."""
    phrases = [shape_phrase(s) for s in reversed(attrs.shapes)]
    joiner = " in front of " if attrs.overlap else " and "
    return f"{joiner.join(phrases)}, {background_phrase(attrs.background)}"


def layout_free_caption(attrs: SceneAttributes) -> str:
    """The caption without where things are: no position phrases, "and" for "in front of".

    'a small green triangle, on a purple background'. What a user writes when a control
    map, not the prompt, is meant to give the layout (ControlNet training and evaluation).
    """
    phrases = [f"a {s.size} {s.colour} {s.shape}" for s in reversed(attrs.shapes)]
    return f"{' and '.join(phrases)}, {background_phrase(attrs.background)}"


def single_caption(shape: str, colour: str, position: str, size: str, background: str) -> str:
    """Caption of a one-shape scene on a plain background (what evaluation prompts use)."""
    spec = ShapeSpec(shape, colour, position, size)
    return caption(SceneAttributes((spec,), (background,)))


def vocabulary() -> list[str]:
    """Every word any caption can contain (the tokenizer must cover them all)."""
    words = {"a", "an", "and", "in", "front", "of", "on", "background", "the", "at", ","}
    words.update(COLOURS, SHAPES, SIZES)
    for phrase in _POSITION_PHRASE.values():
        words.update(phrase.split())
    return sorted(words)


# ---------------------------------------------------------------- sampling


def _sample_shape(rng: np.random.Generator, colour: str | None = None, position: str | None = None) -> ShapeSpec:
    """A random shape with small jitter in place and size, so the model sees variety."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    position = position or POSITIONS[rng.integers(len(POSITIONS))]
    size = SIZES[rng.integers(len(SIZES))]
    cx, cy = _CENTRES[position]
    jitter = rng.uniform(-2.5, 2.5, size=2)
    radius = _RADII[size] * rng.uniform(0.9, 1.1)
    return ShapeSpec(shape, colour, position, size, cx + jitter[0], cy + jitter[1], radius)


def _other_colour(rng: np.random.Generator, exclude: set[str]) -> str:
    """A colour not in `exclude` (a shape must stand out from what is behind it)."""
    choices = [c for c in COLOURS if c not in exclude]
    return choices[rng.integers(len(choices))]


def sample_attributes(rng: np.random.Generator) -> SceneAttributes:
    """Random scene attributes: one or two shapes on a plain or two-tone background."""
    n_bg = 2 if rng.random() < P_TWO_TONE else 1
    background: list[str] = []
    for _ in range(n_bg):
        background.append(_other_colour(rng, set(background)))
    first = _sample_shape(rng, colour=_other_colour(rng, set(background)))
    if rng.random() < P_SINGLE:
        return SceneAttributes((first,), tuple(background))
    # Two shapes at different places, in different colours, so each phrase is visible.
    position = [p for p in POSITIONS if p != first.position][rng.integers(len(POSITIONS) - 1)]
    second = _sample_shape(rng, colour=_other_colour(rng, set(background) | {first.colour}), position=position)
    return SceneAttributes((first, second), tuple(background))


# ---------------------------------------------------------------- rendering


def _shape_mask(spec: ShapeSpec) -> np.ndarray:
    """Anti-aliased coverage of one shape, float32 in [0, 1], shape (SIZE, SIZE)."""
    big = Image.new("L", (SIZE * _SUPER, SIZE * _SUPER), 0)
    draw = ImageDraw.Draw(big)
    x, y, r = spec.cx * _SUPER, spec.cy * _SUPER, spec.radius * _SUPER
    if spec.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    elif spec.shape == "square":
        s = r * 0.89  # same area as the circle, so size reads the same for every shape
        draw.rectangle([x - s, y - s, x + s, y + s], fill=255)
    elif spec.shape == "triangle":
        h = r * 1.15  # upright triangle, a little taller so its area is comparable
        draw.polygon([(x, y - h), (x - h, y + 0.8 * h), (x + h, y + 0.8 * h)], fill=255)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")
    small = big.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(background: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Background image (H, W, 3) float and its region labels (0 top, 1 bottom)."""
    img = np.empty((SIZE, SIZE, 3), np.float32)
    region = np.zeros((SIZE, SIZE), np.int32)
    img[:] = COLOURS[background[0]]
    if len(background) == 2:
        img[SIZE // 2 :] = COLOURS[background[1]]
        region[SIZE // 2 :] = 1
    return img, region


def _edges(labels: np.ndarray) -> np.ndarray:
    """255 where a pixel's label differs from its right or lower neighbour, else 0."""
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    edge[1:, :] |= labels[:-1, :] != labels[1:, :]
    return edge.astype(np.uint8) * 255


def render(attrs: SceneAttributes) -> Scene:
    """Draw the scene back to front; derive caption, edge and depth maps from it."""
    img, region = _background(attrs.background)
    labels = np.zeros((SIZE, SIZE), np.int32)
    masks = []
    for k, spec in enumerate(attrs.shapes, start=1):
        alpha = _shape_mask(spec)
        masks.append(alpha > 0.5)
        img = img * (1 - alpha[..., None]) + np.asarray(COLOURS[spec.colour], np.float32) * alpha[..., None]
        labels[alpha > 0.5] = k
    overlap = len(masks) == 2 and bool((masks[0] & masks[1]).any())
    attrs = SceneAttributes(attrs.shapes, attrs.background, overlap)
    # Depth: background 0; shapes evenly spaced towards 255, the front one nearest.
    n = len(attrs.shapes)
    depth_levels = np.array([0] + [round(255 * k / n) for k in range(1, n + 1)], np.uint8)
    # Edges also separate the two background tones (region labels offset past shapes).
    edge_labels = np.where(labels > 0, labels, -1 - region)
    return Scene(
        image=np.clip(np.rint(img), 0, 255).astype(np.uint8),
        attributes=attrs,
        caption=caption(attrs),
        edges=_edges(edge_labels),
        depth=depth_levels[labels],
        labels=labels,
    )


def make_scene(seed: int) -> Scene:
    """The scene for one seed: the same seed always gives the same scene."""
    return render(sample_attributes(np.random.default_rng(seed)))


def make_single(
    shape: str, colour: str, position: str, size: str, background: str, seed: int = 0
) -> Scene:
    """A one-shape scene with the given attributes (jitter drawn from `seed`)."""
    rng = np.random.default_rng(seed)
    spec = _sample_shape(rng, colour=colour, position=position)
    spec = ShapeSpec(shape, colour, position, size, spec.cx, spec.cy, _RADII[size] * rng.uniform(0.9, 1.1))
    return render(SceneAttributes((spec,), (background,)))


def depth_orders_front(depth_img: Image.Image | np.ndarray, scene: Scene) -> bool:
    """Whether a depth map (near = bright) puts the scene's front shape nearer than what lies behind it.

    The map's mean inside the front shape must exceed its mean inside the back shape (two
    shapes) or over the background (one shape). A rank check, not a metric, since MiDaS
    depth is relative: what a trained depth estimator must get right on these scenes.
    """
    depth = np.asarray(depth_img.convert("L") if isinstance(depth_img, Image.Image) else depth_img, np.float64)
    if depth.ndim == 3:
        depth = depth.mean(axis=-1)
    if depth.shape != scene.labels.shape:
        raise ValueError(f"depth map is {depth.shape[1]}x{depth.shape[0]} but the scene is "
                         f"{scene.labels.shape[1]}x{scene.labels.shape[0]}")
    front = len(scene.attributes.shapes)
    behind = front - 1  # label of the back shape, or 0 (background) in a one-shape scene
    front_mask, behind_mask = scene.labels == front, scene.labels == behind
    if not front_mask.any() or not behind_mask.any():
        raise ValueError("the scene shows no pixels of its front shape or of what lies behind it")
    return bool(depth[front_mask].mean() > depth[behind_mask].mean())


def sample_single_attributes(rng: np.random.Generator) -> dict[str, str]:
    """Random attributes of a one-shape, plain-background scene (evaluation prompts)."""
    background = list(COLOURS)[rng.integers(len(COLOURS))]
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": _other_colour(rng, {background}),
        "position": POSITIONS[rng.integers(len(POSITIONS))],
        "size": SIZES[rng.integers(len(SIZES))],
        "background": background,
    }


def render_dataset(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """n scenes as a uint8 array (n, H, W, 3) and their captions; scene i uses seed*1e6+i."""
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    captions = []
    for i in range(n):
        scene = make_scene(seed * 1_000_000 + i)
        images[i] = scene.image
        captions.append(scene.caption)
    return images, captions


# ---------------------------------------------------------------- stick figures
#
# Pose conditioning data: a stick figure with its 18 OpenPose keypoints and the skeleton
# map a pose ControlNet is trained on, drawn by sdbatch.pose exactly as the pose
# preprocessor draws estimated keypoints.

# Body proportions as fractions of the standing height (head top to ankles ~0.94).
_HEAD_R, _NECK, _SHOULDER, _TORSO, _HIP = 0.08, 0.03, 0.11, 0.30, 0.065
_UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.16, 0.14, 0.23, 0.22
# Keep the figure this far inside the image so every keypoint is visible.
_MARGIN = 3.0


@dataclass
class Figure:
    """A stick figure: uint8 image (H, W, 3), OpenPose keypoints (18, 3: x, y, visible), pose map (H, W, 3)."""

    image: np.ndarray
    keypoints: np.ndarray
    pose_map: np.ndarray
    caption: str

    def pil(self) -> Image.Image:
        """The image as a PIL RGB image."""
        return Image.fromarray(self.image)


def _limb(start: np.ndarray, angle: float, length: float, side: int) -> np.ndarray:
    """End of a limb `angle` degrees out from straight down; side -1 is the person's right (image left)."""
    a = np.radians(angle)
    return start + length * np.array([side * np.sin(a), np.cos(a)])


def _figure_keypoints(rng: np.random.Generator, height: float) -> np.ndarray:
    """BODY_18 keypoints (18, 2) of a random front-facing pose, neck at the origin.

    The figure faces the viewer, so its right side is on the image's left, as in OpenPose.
    Angles stay within what a body does: arms from slightly crossed to overhead, elbows
    bending one way, legs apart up to 35 degrees, knees bending inwards, a small lean.
    """
    lean = np.radians(rng.uniform(-8, 8))
    down = np.array([np.sin(lean), np.cos(lean)])  # neck to hips
    across = np.array([np.cos(lean), -np.sin(lean)])  # towards the person's left
    neck = np.zeros(2)
    head = neck - down * (_NECK + _HEAD_R) * height
    r = _HEAD_R * height
    points = {
        "nose": head + [0, 0.15 * r],
        "neck": neck,
        "r_eye": head + [-0.4 * r, -0.2 * r],
        "l_eye": head + [0.4 * r, -0.2 * r],
        "r_ear": head + [-0.95 * r, 0],
        "l_ear": head + [0.95 * r, 0],
    }
    hips = neck + down * _TORSO * height
    for side, name in ((-1, "r"), (1, "l")):
        shoulder = neck + side * across * _SHOULDER * height
        upper = rng.uniform(-20, 160)
        elbow = _limb(shoulder, upper, _UPPER_ARM * height, side)
        wrist = _limb(elbow, upper + rng.uniform(-20, 110), _FOREARM * height, side)
        hip = hips + side * across * _HIP * height
        thigh = rng.uniform(-5, 35)
        knee = _limb(hip, thigh, _THIGH * height, side)
        ankle = _limb(knee, thigh - rng.uniform(0, 40), _SHIN * height, side)
        points.update({f"{name}_shoulder": shoulder, f"{name}_elbow": elbow, f"{name}_wrist": wrist,
                       f"{name}_hip": hip, f"{name}_knee": knee, f"{name}_ankle": ankle})
    order = ("nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
             "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear")
    return np.array([points[k] for k in order], np.float64)


def _draw_figure(points: np.ndarray, height: float, colour: str, background: str) -> np.ndarray:
    """The stick figure (head disc with two eyes, limbs as thick lines), anti-aliased, uint8 (H, W, 3)."""
    big = Image.new("L", (SIZE * _SUPER, SIZE * _SUPER), 0)
    draw = ImageDraw.Draw(big)
    # Keypoints put pixel i's centre at coordinate i (as OpenPose and the pose map do);
    # at 4x, with PIL's integer coordinates on pixel centres too, that is 4x + 1.5.
    s = points * _SUPER + (_SUPER - 1) / 2
    width = round(max(1.5, height / 22) * _SUPER)
    hips = (s[8] + s[11]) / 2
    for path in ((2, 5), (8, 11), (2, 3, 4), (5, 6, 7), (8, 9, 10), (11, 12, 13)):
        draw.line([tuple(s[i]) for i in path], fill=255, width=width, joint="curve")
    draw.line([tuple(s[1]), tuple(hips)], fill=255, width=width)
    head = (s[16] + s[17]) / 2
    r = _HEAD_R * height * _SUPER
    draw.line([tuple(s[1]), tuple(head)], fill=255, width=width)
    draw.ellipse([head[0] - r, head[1] - r, head[0] + r, head[1] + r], fill=255)
    for eye in (s[14], s[15]):  # eyes as holes in the head, so a face reads as a face
        e = 0.18 * r
        draw.ellipse([eye[0] - e, eye[1] - e, eye[0] + e, eye[1] + e], fill=0)
    alpha = np.asarray(big.resize((SIZE, SIZE), Image.Resampling.BOX), np.float32)[..., None] / 255.0
    img = np.asarray(COLOURS[background], np.float32) * (1 - alpha) + np.asarray(COLOURS[colour], np.float32) * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def draw_pose_map(keypoints: np.ndarray, size: int = SIZE, threshold: float = 0.3) -> np.ndarray:
    """OpenPose skeleton of one person (18, 3: x, y, score) on black, uint8 (size, size, 3)."""
    from sdbatch.pose import draw_pose

    return np.asarray(draw_pose([keypoints], (size, size), threshold))


def make_figure(seed: int) -> Figure:
    """A random stick figure on a plain background, with its keypoints and pose map (same seed, same figure)."""
    rng = np.random.default_rng(seed)
    background = list(COLOURS)[rng.integers(len(COLOURS))]
    colour = _other_colour(rng, {background})
    height = rng.uniform(32.0, 50.0)
    points = _figure_keypoints(rng, height)
    # Place the whole figure (head disc included) inside the margin, at a random spot.
    r = _HEAD_R * height
    head = (points[16] + points[17]) / 2
    low = np.minimum(points.min(axis=0), head - r) - _MARGIN
    high = np.maximum(points.max(axis=0), head + r) + _MARGIN
    room = SIZE - (high - low)
    offset = -low + np.where(room > 0, rng.uniform(0, 1, 2) * np.maximum(room, 0), room / 2)
    points = points + offset
    visible = ((points >= 0) & (points <= SIZE - 1)).all(axis=1).astype(np.float64)
    keypoints = np.concatenate([points, visible[:, None]], axis=1).astype(np.float32)
    article = _article(colour)
    return Figure(
        image=_draw_figure(points, height, colour, background),
        keypoints=keypoints,
        pose_map=draw_pose_map(keypoints),
        caption=f"{article} {colour} stick figure, {background_phrase((background,))}",
    )
