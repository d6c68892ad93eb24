"""HR images for the Inf-DiT SR testbed: where its x4 training pairs and its held-out pairs come from.

Two sources, both made on the machine (nothing is downloaded):

- ``procedural``: the FLUX testbed's shape scenes (`hicache.testbeds.flux_shapes.dataset`) rendered at the HR size. Sharp
  edges, stripes and gradients that bicubic upsampling blurs, so there is something to learn. Training scenes
  are the dataset's training stream (seed, index); the held-out scenes are the dataset's held-out captions,
  which the training stream never produces, so train and held-out images are disjoint by construction.
- ``photos``: random crops of the photos bundled with scikit-image; two photos are held out entirely. They
  are much smoother than the training photos (bicubic 36 dB vs 27 dB), i.e. a different distribution.

``mixed`` trains on both (half each) and holds out both. The LR input is always the antialiased bicubic x4
downscale of the HR image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TRAIN_PHOTOS = ("astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle",
                "colorwheel", "logo")
HELDOUT_PHOTOS = ("rocket", "chelsea")
SOURCES = ("procedural", "photos", "mixed")
PROCEDURAL_SEED = 0
HELDOUT_SEED = 1234


def check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of {', '.join(SOURCES)}, got {source!r}")


def load_photo(name: str) -> torch.Tensor:
    """(3, H, W) float in [0, 1] from skimage.data (RGB; RGBA composited on white; grey replicated)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):
        image = image[0]
    image = np.asarray(image, dtype=np.float32) / 255.0
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.shape[-1] == 4:
        image = image[..., :3] * image[..., 3:] + (1 - image[..., 3:])
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def downscale(hr: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """The degradation: antialiased bicubic downscaling of (B, 3, H, W) in [0, 1], clamped to [0, 1]."""
    h, w = hr.shape[-2:]
    return F.interpolate(hr, size=(h // factor, w // factor), mode="bicubic", antialias=True,
                         align_corners=False).clamp(0, 1)


def random_crops(photos: list[torch.Tensor], n: int, size: int, generator: torch.Generator,
                 min_scale: float = 0.25) -> torch.Tensor:
    """n random size x size crops, each from a randomly downscaled, flipped and turned photo."""
    crops = []
    for _ in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        h, w = photo.shape[-2:]
        low = max(min_scale, size / min(h, w))
        scale = float(low + (1 - low) * torch.rand(1, generator=generator))
        if scale < 1:
            photo = F.interpolate(photo[None], size=(max(size, round(h * scale)), max(size, round(w * scale))),
                                  mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
        h, w = photo.shape[-2:]
        top = int(torch.randint(h - size + 1, (1,), generator=generator))
        left = int(torch.randint(w - size + 1, (1,), generator=generator))
        crop = photo[:, top : top + size, left : left + size]
        if torch.rand(1, generator=generator) < 0.5:
            crop = crop.flip(-1)
        crops.append(torch.rot90(crop, int(torch.randint(4, (1,), generator=generator)), dims=(-2, -1)))
    return torch.stack(crops)


def render_scenes(scenes, size: int) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: the scenes drawn directly at the HR size (no augmentation, so a training
    image can never turn into a held-out caption's layout)."""
    from hicache.testbeds.flux_shapes.dataset import render

    arrays = [np.asarray(render(scene, size), dtype=np.float32) / 255.0 for scene in scenes]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def procedural_train(n: int, size: int, seed: int = PROCEDURAL_SEED) -> torch.Tensor:
    from hicache.testbeds.flux_shapes.dataset import training_scene

    return render_scenes([training_scene(seed, i) for i in range(n)], size)


def procedural_heldout(n: int, size: int, seed: int = PROCEDURAL_SEED) -> torch.Tensor:
    from hicache.testbeds.flux_shapes.dataset import heldout_scenes

    return render_scenes(heldout_scenes(n, seed), size)


def photo_heldout(n: int, size: int, seed: int = HELDOUT_SEED) -> torch.Tensor:
    return random_crops([load_photo(p) for p in HELDOUT_PHOTOS], n, size, torch.Generator().manual_seed(seed))


def training_images(source: str, n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """The HR training pool of ``source`` (photo crops draw from ``generator``; scenes are fixed by index)."""
    check_source(source)
    if source == "procedural":
        return procedural_train(n, size)
    photos = [load_photo(p) for p in TRAIN_PHOTOS]
    if source == "photos":
        return random_crops(photos, n, size, generator)
    return torch.cat([procedural_train(n - n // 2, size), random_crops(photos, n // 2, size, generator)])


def heldout_images(source: str, n: int, size: int) -> torch.Tensor:
    """The fixed held-out HR images of ``source`` (``mixed``: the first half scenes, the rest photo crops)."""
    check_source(source)
    if source == "procedural":
        return procedural_heldout(n, size)
    if source == "photos":
        return photo_heldout(n, size)
    return torch.cat([procedural_heldout(n - n // 2, size), photo_heldout(n // 2, size)])


def heldout_description(source: str) -> dict:
    """What the held-out set is, for testbed.json."""
    check_source(source)
    parts = {}
    if source in ("procedural", "mixed"):
        parts["procedural"] = (f"hicache.testbeds.flux_shapes.dataset.heldout_scenes(n, seed={PROCEDURAL_SEED}): held-out captions "
                               f"(crc32 % 8 == 0), never in the training stream")
    if source in ("photos", "mixed"):
        parts["photos"] = f"random crops (seed {HELDOUT_SEED}) of skimage.data {', '.join(HELDOUT_PHOTOS)}"
    return parts


def heldout_pairs(n: int = 16, size: int = 64, source: str = "photos") -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (HR, LR) evaluation pairs in [0, 1]."""
    hr = heldout_images(source, n, size)
    return hr, downscale(hr)
