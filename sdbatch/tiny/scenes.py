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
