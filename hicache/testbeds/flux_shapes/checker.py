"""Which caption attributes an image satisfies: the testbed's measurable quality signal.

The caption is parsed back into a scene (`dataset.parse_caption`); each named object is then
looked for by its colour: pixels whose nearest reference colour (the shape palette plus the shades
of the caption's background) is the named colour form a mask, and its largest connected component
is the object. Its bounding box gives position (3x3 grid cell of the box centre) and size (box
extent against the midpoint of small and large), and its region properties give the kind:
a star is the only non-convex shape (low solidity), a square fills its box, a circle fills ~79 %
of it, a triangle ~50 %. The background is read from per-row median colours, which the shapes
cannot dominate: a plain background is flat, a gradient changes monotonically, stripes alternate.

All thresholds sit between the values the renderer produces, with margins for a generator's blur.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage.measure import label, regionprops

from .dataset import BACKGROUNDS, COLOURS, DARK_SHADE, RESOLUTION, SIZES, parse_caption

COLOUR_TOLERANCE = 0.35  # max RGB distance (in [0, 1] units) of a pixel to its colour
MIN_AREA_FRACTION = 0.3  # an object smaller than this fraction of a small circle is not found
STAR_SOLIDITY = 0.8
SQUARE_EXTENT = 0.89
CIRCLE_EXTENT = 0.65
FLAT_BACKGROUND = 0.12  # max row-colour range of a plain background
STRIPE_RATIO = 2.5  # total variation / range of the row colours above which it is striped

ATTRIBUTES = ("shape", "colour", "position", "size")


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return array / 255.0 if array.max() > 1.5 else array


def _references(background_colour: str) -> tuple[list[str], np.ndarray]:
    names = list(COLOURS)
    refs = [np.asarray(COLOURS[n], dtype=np.float32) / 255 for n in names]
    base = np.asarray(COLOURS[background_colour], dtype=np.float32) / 255
    for f in np.linspace(DARK_SHADE, 1.0, 6):
        names.append("background")
        refs.append(base * f)
    return names, np.stack(refs)


def colour_mask(image: np.ndarray, colour: str, background_colour: str) -> np.ndarray:
    """Pixels closest to `colour` among all reference colours, and within tolerance of it."""
    names, refs = _references(background_colour)
    dist = np.linalg.norm(image[:, :, None, :] - refs[None, None], axis=-1)
    nearest = dist.argmin(-1)
    target = names.index(colour)
    return (nearest == target) & (dist[..., target] < COLOUR_TOLERANCE)


def classify_shape(region) -> str:
    if region.solidity < STAR_SOLIDITY:
        return "star"
    if region.extent > SQUARE_EXTENT:
        return "square"
    return "circle" if region.extent > CIRCLE_EXTENT else "triangle"


def _find_object(mask: np.ndarray, scale: float):
    labels = label(mask, connectivity=1)
    regions = regionprops(labels)
    if not regions:
        return None
    region = max(regions, key=lambda r: r.area)
    min_area = MIN_AREA_FRACTION * np.pi * (SIZES["small"] * scale) ** 2
    return region if region.area >= min_area else None


def check_object(image: np.ndarray, spec, background_colour: str) -> dict[str, bool]:
    """Shape/colour/position/size of one described object; all False if its colour is absent."""
    h, w = image.shape[:2]
    scale = h / RESOLUTION
    region = _find_object(colour_mask(image, spec.colour, background_colour), scale)
    if region is None:
        return {k: False for k in ATTRIBUTES if _says(spec, k)}
    r0, c0, r1, c1 = region.bbox
    cy, cx = (r0 + r1) / 2, (c0 + c1) / 2
    cell = (min(2, int(3 * cy / h)), min(2, int(3 * cx / w)))
    extent = max(r1 - r0, c1 - c0) / scale
    # boxes span ~2*half-extent (stars ~1.1x more); the threshold is the midpoint of small and large
    size = "large" if extent > SIZES["small"] + SIZES["large"] + 0.5 else "small"
    result = {"shape": classify_shape(region) == spec.shape, "colour": True, "position": cell == spec.cell, "size": size == spec.size}
    return {k: v for k, v in result.items() if _says(spec, k)}


def _says(spec, attribute: str) -> bool:
    """Only what the caption states is scored (captions may leave size and position unsaid)."""
    return {"size": spec.says_size, "position": spec.says_position}.get(attribute, True)


def background_of(image: np.ndarray, exclude: np.ndarray | None = None) -> tuple[str, str]:
    """(colour, style) of the background from the per-row median colours of non-`exclude` pixels."""
    if exclude is not None and (~exclude).any(axis=1).all():
        image = np.where(exclude[..., None], np.nan, image)
    rows = np.nanmedian(image, axis=1)  # (H, 3)
    centre = np.median(rows, axis=0)
    amplitude = np.linalg.norm(rows - centre, axis=1).max() * 2
    steps = np.linalg.norm(np.diff(rows, axis=0), axis=1).sum()
    if amplitude < FLAT_BACKGROUND:
        style = "plain"
    else:
        style = "striped" if steps / amplitude > STRIPE_RATIO else "gradient"
    brightness = np.linalg.norm(rows, axis=1)
    base = rows[brightness >= np.quantile(brightness, 0.75)].mean(axis=0)
    names = list(COLOURS)
    refs = np.stack([np.asarray(COLOURS[n], dtype=np.float32) / 255 for n in names])
    colour = names[int(np.linalg.norm(refs - base, axis=1).argmin())]
    assert style in BACKGROUNDS
    return colour, style


def check(image, caption: str) -> dict[str, bool]:
    """Attribute -> satisfied, for a caption in the testbed grammar.

    Keys: ``shape``, ``colour``, ``position``, ``size`` for the first object (``shape2`` ... for a
    second one), ``background_colour`` and ``background_style``; an attribute the caption leaves unsaid
    (size, position, background style) has no key.
    """
    array = _as_array(image)
    scene = parse_caption(caption)
    result: dict[str, bool] = {}
    objects = np.zeros(array.shape[:2], dtype=bool)
    for i, spec in enumerate(scene.shapes):
        suffix = "" if i == 0 else str(i + 1)
        for key, ok in check_object(array, spec, scene.background_colour).items():
            result[key + suffix] = ok
        objects |= colour_mask(array, spec.colour, scene.background_colour)
    colour, style = background_of(array, exclude=objects)
    result["background_colour"] = colour == scene.background_colour
    if scene.says_style:
        result["background_style"] = style == scene.background_style
    return result


def accuracy(results: list[dict[str, bool]]) -> float:
    """Fraction of all checked attributes that hold."""
    total = sum(len(r) for r in results)
    return sum(sum(r.values()) for r in results) / max(1, total)
