"""Procedural captioned shape images, deterministic by seed and index.

The testbed needs data that is (a) free to generate on a machine with no downloads, (b) captioned
by a small grammar so a word-level tokenizer covers every prompt, and (c) checkable: every caption
word maps to a measurable property of the image (see `checker.py`). A scene has one or two shapes,
each with a shape kind, colour, size and grid position, on a plain, gradient or striped background.

Held-out captions are split off by a hash of the caption text, so the training sampler never sees a
held-out caption and the split needs no stored list.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 64
_SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 5.0, "large": 9.0}  # half-extent in pixels at 64 px
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}
BACKGROUNDS = ("plain", "gradient", "striped")
DARK_SHADE = 0.5  # gradients and stripes run from the colour to this fraction of it
STRIPE_PERIOD = 16  # pixels at 64 px
JITTER = 1.5  # max centre offset from the grid cell centre, pixels
TWO_SHAPE_PROB = 0.3
HELDOUT_MODULUS = 8  # a caption is held out when crc32(caption) % HELDOUT_MODULUS == 0

VOCABULARY = sorted(
    set("a and at the on in of background".split())
    | set(COLOURS)
    | set(SHAPES)
    | set(SIZES)
    | set(BACKGROUNDS)
    | {w for phrase in POSITIONS.values() for w in phrase.split()}
)


TEXTURE_IMAGES = ("brick", "grass", "gravel", "camera", "moon", "coins", "astronaut", "coffee", "chelsea", "rocket")


CLOUD_OCTAVES = (2, 4, 8)  # grid cells across the image; 8 is one cell per latent pixel of the x8 VAE


@dataclass(frozen=True)
class Variation:
    """What a scene varies that its caption does not say (issue 16).

    A caption that fixes almost everything makes the conditional distribution nearly a point, and a
    rectified flow trained on it is nearly straight, unlike a real text-to-image model's. These knobs
    widen it without touching what the caption states (and what the checker measures). The defaults
    reproduce the original stream exactly (no extra random draws), which the SR testbed relies on.

    Args:
        jitter: max offset (pixels) of a shape's centre from its grid cell's centre.
        size_spread: a shape's half-extent is its size's times U(1 - s, 1 + s).
        texture: amplitude of a grey natural-image texture (a random crop of one of scikit-image's
            bundled images) that modulates the background's brightness; 0 is none.
        unsaid_size, unsaid_position, unsaid_style: probability that a caption leaves a shape's size,
            a shape's grid position or the background's style unsaid (the scene still has one, drawn
            uniformly). Real captions leave most of an image unsaid, so the model must pick a mode
            from the noise, which is what bends a real model's sampling path; the checker scores only
            what a caption says.
        clouds: amplitude of a smooth random brightness field on the background (octaves of `cloud_octaves` cells
            with 1/f amplitudes, the spectrum of natural images, coarse enough for the x8 VAE to keep): coarse
            octaves are decided early in sampling and fine ones late, as a real image's details are; 0 is none.
        cloud_octaves: the clouds' grid sizes, in cells across the image; (2, 4, 8, 16) reaches every latent
            pixel of the x4 VAE (16 across), as (2, 4, 8) does the x8 VAE's.
    """

    jitter: float = JITTER
    size_spread: float = 0.0
    texture: float = 0.0
    unsaid_size: float = 0.0
    unsaid_position: float = 0.0
    unsaid_style: float = 0.0
    clouds: float = 0.0
    cloud_octaves: tuple[int, ...] = CLOUD_OCTAVES

    def __post_init__(self):
        octaves = tuple(self.cloud_octaves)  # a config passes a list
        if not octaves or any(not float(c).is_integer() or c < 1 for c in octaves):
            raise ValueError(f"cloud_octaves must be grid sizes (whole numbers >= 1), at least one; got {list(octaves)}")
        object.__setattr__(self, "cloud_octaves", tuple(int(c) for c in octaves))

    @property
    def leaves_unsaid(self) -> bool:
        return bool(self.unsaid_size or self.unsaid_position or self.unsaid_style)


DEFAULT_VARIATION = Variation()


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]  # (row, col) in the 3x3 grid
    offset: tuple[float, float] = (0.0, 0.0)  # (dy, dx) jitter in pixels; not in the caption
    scale: float = 1.0  # half-extent factor on SIZES[size]; not in the caption
    says_size: bool = True  # whether the caption states the size ...
    says_position: bool = True  # ... and the grid position (parsed captions: `cell` is meaningless if not)

    @property
    def half_size(self) -> float:
        return SIZES[self.size] * self.scale

    @property
    def phrase(self) -> str:
        words = ["a", self.size if self.says_size else "", self.colour, self.shape, POSITIONS[self.cell] if self.says_position else ""]
        return " ".join(w for w in words if w)


@dataclass(frozen=True)
class Texture:
    """A square crop of a bundled image: which image, crop box in [0, 1] units, amplitude."""

    image: str
    top: float
    left: float
    side: float
    amplitude: float


@dataclass(frozen=True)
class Clouds:
    """A procedural smooth random field: its seed and amplitude (`clouds_field`)."""

    seed: int
    amplitude: float
    octaves: tuple[int, ...] = CLOUD_OCTAVES


@dataclass(frozen=True)
class Scene:
    shapes: tuple[ShapeSpec, ...]
    background_colour: str
    background_style: str
    texture: Texture | None = None  # not in the caption
    says_style: bool = True  # whether the caption states the background style
    clouds: Clouds | None = None  # not in the caption

    @property
    def caption(self) -> str:
        objects = " and ".join(s.phrase for s in self.shapes)
        style = f" {self.background_style}" if self.says_style else ""
        return f"{objects} on a {self.background_colour}{style} background"


def cell_centre(cell: tuple[int, int], resolution: int = RESOLUTION) -> tuple[float, float]:
    """(y, x) centre of a 3x3 grid cell in pixels."""
    third = resolution / 3
    return (cell[0] + 0.5) * third, (cell[1] + 0.5) * third


def _half_extents(spec: ShapeSpec) -> tuple[float, float]:
    """(half height, half width) of the shape's bounding box, pixels at 64 px."""
    s = spec.half_size
    if spec.shape == "star":
        r = 1.15 * s
        return r * (1 + math.cos(math.pi / 5)) / 2, r * math.sin(2 * math.pi / 5)
    return s, s


def _overlaps(a: ShapeSpec, b: ShapeSpec, margin: float = 2.0) -> bool:
    (ay, ax), (by, bx) = cell_centre(a.cell), cell_centre(b.cell)
    ay, ax, by, bx = ay + a.offset[0], ax + a.offset[1], by + b.offset[0], bx + b.offset[1]
    (ah, aw), (bh, bw) = _half_extents(a), _half_extents(b)
    return abs(ay - by) < ah + bh + margin and abs(ax - bx) < aw + bw + margin


def is_heldout(caption: str) -> bool:
    return zlib.crc32(caption.encode()) % HELDOUT_MODULUS == 0


def random_scene(rng: np.random.Generator, num_shapes: int | None = None, variation: Variation = DEFAULT_VARIATION) -> Scene:
    """One scene from the full distribution (held-out captions included)."""
    if num_shapes is None:
        num_shapes = 2 if rng.random() < TWO_SHAPE_PROB else 1
    colours = list(COLOURS)
    while True:
        picked = rng.choice(len(colours), size=num_shapes + 1, replace=False)
        cells = rng.choice(9, size=num_shapes, replace=False)
        shapes = tuple(
            ShapeSpec(
                shape=SHAPES[rng.integers(len(SHAPES))],
                colour=colours[picked[i]],
                size=list(SIZES)[rng.integers(len(SIZES))],
                cell=(int(cells[i]) // 3, int(cells[i]) % 3),
                offset=tuple(float(v) for v in rng.uniform(-variation.jitter, variation.jitter, size=2)),
                scale=float(rng.uniform(1 - variation.size_spread, 1 + variation.size_spread)) if variation.size_spread else 1.0,
            )
            for i in range(num_shapes)
        )
        if num_shapes == 2 and _overlaps(*shapes):
            continue
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        texture = None
        if variation.texture:
            side = float(rng.uniform(0.15, 0.6))
            top, left = (float(v) for v in rng.uniform(0, 1 - side, size=2))
            texture = Texture(TEXTURE_IMAGES[rng.integers(len(TEXTURE_IMAGES))], top, left, side, variation.texture)
        clouds = Clouds(int(rng.integers(2**31)), variation.clouds, variation.cloud_octaves) if variation.clouds else None
        says_style = True
        if variation.leaves_unsaid:  # extra draws only then: the default stream stays as it was
            shapes = tuple(
                replace(s, says_size=bool(rng.random() >= variation.unsaid_size),
                        says_position=bool(rng.random() >= variation.unsaid_position))
                for s in shapes
            )
            says_style = bool(rng.random() >= variation.unsaid_style)
        return Scene(shapes, colours[picked[-1]], background, texture, says_style, clouds)


def training_scene(seed: int, index: int, variation: Variation = DEFAULT_VARIATION) -> Scene:
    """Scene `index` of the training stream of `seed`; never has a held-out caption."""
    rng = np.random.default_rng([seed, index])
    while True:
        scene = random_scene(rng, variation=variation)
        if not is_heldout(scene.caption):
            return scene


def heldout_scenes(n: int, seed: int = 0, variation: Variation = DEFAULT_VARIATION) -> list[Scene]:
    """`n` scenes with distinct held-out captions, deterministic in `seed` (and `variation`)."""
    rng = np.random.default_rng([seed, 0x4E1D])
    scenes, seen = [], set()
    while len(scenes) < n:
        scene = random_scene(rng, variation=variation)
        if is_heldout(scene.caption) and scene.caption not in seen:
            seen.add(scene.caption)
            scenes.append(scene)
    return scenes


def heldout_captions(n: int = 64, seed: int = 0, variation: Variation | None = None) -> list[str]:
    """The held-out prompts of a testbed trained on `variation` (default: the shipped testbed's, from its
    `testbed.json`). The knobs vary what captions do not say (the `unsaid_*` ones also what they say), but any
    knob that draws random numbers per scene (clouds, texture, size spread, unsaid) shifts the stream, so each
    variation has its own held-out captions: compare testbeds on one set (`testbed_regime.py` scores (c) on both)."""
    if variation is None:
        variation = shipped_variation()
    return [s.caption for s in heldout_scenes(n, seed, variation)]


def variation_of(folder) -> Variation:
    """The data `Variation` a testbed pipeline folder was trained on (its `testbed.json`; none: the default)."""
    path = Path(folder) / "testbed.json"
    if not path.is_file():
        return DEFAULT_VARIATION
    return Variation(**json.loads(path.read_text()).get("data", {}))


def shipped_variation() -> Variation:
    from .. import WEIGHTS_DIR

    return variation_of(WEIGHTS_DIR / "flux_shapes")


def _star_points(cy: float, cx: float, r: float, inner: float = 0.45) -> list[tuple[float, float]]:
    # centred on its bounding box, so the caption's position refers to the visible extent
    top, bottom = -r, r * math.cos(math.pi / 5)
    shift = (top + bottom) / 2
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * inner
        angle = math.pi * k / 5
        points.append((cx + radius * math.sin(angle), cy - radius * math.cos(angle) - shift))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, spec: ShapeSpec, scale: float) -> None:
    cy, cx = cell_centre(spec.cell)
    cy, cx = (cy + spec.offset[0]) * scale, (cx + spec.offset[1]) * scale
    s = spec.half_size * scale
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif spec.shape == "square":
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - s), (cx + s, cy + s), (cx - s, cy + s)], fill=fill)
    elif spec.shape == "star":
        draw.polygon(_star_points(cy, cx, 1.15 * s), fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}")


def _background(colour: str, style: str, size: int) -> np.ndarray:
    base = np.asarray(COLOURS[colour], dtype=np.float32)
    y = (np.arange(size, dtype=np.float32) + 0.5) / size
    if style == "plain":
        factor = np.ones_like(y)
    elif style == "gradient":
        factor = 1.0 - (1.0 - DARK_SHADE) * y
    elif style == "striped":
        factor = np.where((y * RESOLUTION) % STRIPE_PERIOD < STRIPE_PERIOD / 2, 1.0, DARK_SHADE)
    else:
        raise ValueError(f"unknown background style {style!r}")
    rows = factor[:, None] * base[None, :]
    return np.broadcast_to(rows[:, None, :], (size, size, 3)).astype(np.uint8)


@lru_cache(maxsize=None)
def _texture_source(name: str) -> np.ndarray:
    """A bundled scikit-image picture as grey floats in [0, 1] (no download: these ship with it)."""
    from skimage import data
    from skimage.color import rgb2gray

    image = getattr(data, name)()
    grey = rgb2gray(image[..., :3]) if image.ndim == 3 else image.astype(np.float64) / 255.0
    return grey.astype(np.float32)


def texture_field(texture: Texture, size: int) -> np.ndarray:
    """Brightness factors (size, size): 1 + amplitude * the crop's values less their row median, over
    their standard deviation, clipped to [-2, 0]. Darkening only, and by at most 2 * amplitude, keeps
    the background within the shades the checker expects of it, and each row's median at 1."""
    source = _texture_source(texture.image)
    h, w = source.shape
    side = max(8, int(texture.side * min(h, w)))
    top, left = int(texture.top * (h - side)), int(texture.left * (w - side))
    crop = Image.fromarray(source[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
    z = np.asarray(crop, dtype=np.float32)
    z = z - np.median(z, axis=1, keepdims=True)  # rows keep their median: the checker reads the style from it
    z = np.clip(z / max(float(z.std()), 1e-3), -2.0, 0.0)  # darken only: stays within the checker's background shades
    return 1.0 + texture.amplitude * z


def clouds_field(clouds: Clouds, size: int) -> np.ndarray:
    """Brightness factors (size, size): octaves of Gaussian noise on `clouds.octaves`-cell grids, bicubically upsampled,
    each weighted by its cell size (a 1/f spectrum), then normalised as `texture_field` (rows keep their median;
    darkening only, by at most 2 * amplitude) so the checker still reads the background."""
    rng = np.random.default_rng(clouds.seed)
    z = np.zeros((size, size), dtype=np.float32)
    for cells in clouds.octaves:
        grid = rng.standard_normal((cells, cells)).astype(np.float32)
        up = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32)
        z += up * clouds.octaves[0] / cells
    z = z - np.median(z, axis=1, keepdims=True)
    z = np.clip(z / max(float(z.std()), 1e-3), -2.0, 0.0)
    return 1.0 + clouds.amplitude * z


def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """The scene as an RGB image (drawn supersampled, then box-filtered, for clean edges)."""
    big = resolution * _SUPERSAMPLE
    background = _background(scene.background_colour, scene.background_style, big)
    if scene.texture is not None:
        # constant on each supersampled block, so the box filter keeps every row's median at 1
        factor = np.repeat(np.repeat(texture_field(scene.texture, resolution), _SUPERSAMPLE, 0), _SUPERSAMPLE, 1)[..., None]
        background = np.clip(background.astype(np.float32) * factor, 0, 255).round().astype(np.uint8)
    if scene.clouds is not None:
        factor = np.repeat(np.repeat(clouds_field(scene.clouds, resolution), _SUPERSAMPLE, 0), _SUPERSAMPLE, 1)[..., None]
        background = np.clip(background.astype(np.float32) * factor, 0, 255).round().astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for spec in scene.shapes:
        _draw_shape(draw, spec, big / RESOLUTION)
    return image.resize((resolution, resolution), Image.BOX)


def shape_mask(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """Per-pixel shape coverage in [0, 1] (anti-aliased like `render`), e.g. to weight a loss."""
    big = resolution * _SUPERSAMPLE
    layer = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(layer)
    for spec in scene.shapes:
        _draw_shape(draw, ShapeSpec(spec.shape, "white", spec.size, spec.cell, spec.offset, spec.scale), big / RESOLUTION)
    coverage = np.asarray(layer.convert("L").resize((resolution, resolution), Image.BOX), dtype=np.float32)
    return coverage / coverage.max() if coverage.max() > 0 else coverage


_POSITION_ALT = "|".join(re.escape(p) for p in POSITIONS.values())
_OBJECT_RE = re.compile(
    rf"a (?:(?P<size>{'|'.join(SIZES)}) )?(?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)})"
    rf"(?: (?P<position>{_POSITION_ALT}))?"
)
_CAPTION_RE = re.compile(
    rf"^(?P<objects>.+) on a (?P<bg_colour>{'|'.join(COLOURS)})(?: (?P<bg_style>{'|'.join(BACKGROUNDS)}))? background$"
)
_CELL_OF = {phrase: cell for cell, phrase in POSITIONS.items()}


def parse_caption(caption: str) -> Scene:
    """Inverse of `Scene.caption` (jitter is not in the caption, so offsets are zero; unsaid attributes are
    placeholders marked unsaid)."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    match = _CAPTION_RE.match(text)
    if not match:
        raise ValueError(f"caption is not in the testbed grammar: {caption!r}")
    parts = match["objects"].split(" and ")
    shapes = []
    for part in parts:
        obj = _OBJECT_RE.fullmatch(part)
        if not obj:
            raise ValueError(f"object phrase {part!r} is not in the testbed grammar")
        # unsaid attributes parse to placeholders ("small", the centre cell, "plain") flagged as unsaid
        shapes.append(ShapeSpec(
            obj["shape"], obj["colour"], obj["size"] or "small", _CELL_OF.get(obj["position"], (1, 1)),
            says_size=obj["size"] is not None, says_position=obj["position"] is not None,
        ))
    style = match["bg_style"]
    return Scene(tuple(shapes), match["bg_colour"], style or "plain", says_style=style is not None)


class ShapesDataset:
    """Endless, indexable training stream: item i is (image, caption), a pure function of (seed, i).

    `length` only bounds `__len__` for samplers and DataLoaders; any index is valid.
    """

    def __init__(self, seed: int = 0, length: int = 100_000, resolution: int = RESOLUTION,
                 variation: Variation = DEFAULT_VARIATION):
        self.seed, self.length, self.resolution, self.variation = seed, length, resolution, variation

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        return training_scene(self.seed, index, self.variation)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        scene = self.scene(index)
        return render(scene, self.resolution), scene.caption
