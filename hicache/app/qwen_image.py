"""Qwen-Image support for the app: loaders, the editing protocol's input sets, and its CLIP image metric.

Registered through the app's extension points, so the runner is the same as for FLUX:

- loaders ``qwen_image`` (`QwenImagePipeline`) and ``qwen_image_edit`` (`QwenImageEditPipeline`, or
  `QwenImageEditPlusPipeline` with ``model.pipeline_class``) from ``model.path``, and ``tiny_qwen_image`` /
  ``tiny_qwen_image_edit`` (the random tiny pipelines of `hicache.testbeds.tiny.qwen_image`, written to
  ``model.path`` once, then loaded with ``from_pretrained`` exactly like the real ones);
- prompt sources for editing, which give each instruction its input image: ``edit_set`` (generated
  here, see `EDIT_SET`) and ``edit_file`` (a table of ``image``/``instruction`` rows, for a public edit
  benchmark exported to a file);
- metric ``clip_image``: the CLIP image-embedding similarity (100 * cosine, torchmetrics' `CLIPScore`
  between two images) of the cached edit and the uncached edit.

The editing protocol (the official HiCache tree has no edit runner and no published edit numbers):
each input image is edited by its instruction with the uncached pipeline (50 steps, true CFG 4.0 with
negative prompt " ", seed = index), then with the cache, same seed; the cached edit is scored against
the uncached one (PSNR, SSIM, LPIPS when its weights are present, ``clip_image`` when CLIP's are), and
both against the instruction (CLIP score, when CLIP's weights are present). See README.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from .errors import SetupError
from .metrics import Metric, register_metric
from .pipelines import from_pretrained, register_loader, resolve_dtype
from .prompts import SOURCES, read_prompt_file

logger = logging.getLogger(__name__)

HINTS = {
    "qwen_image": "download Qwen-Image (huggingface-cli download Qwen/Qwen-Image --local-dir <folder>) and set "
                  "model.path=<folder> or QWEN_IMAGE_PATH=<folder>",
    "qwen_image_edit": "download Qwen-Image-Edit (huggingface-cli download Qwen/Qwen-Image-Edit --local-dir <folder>) "
                       "and set model.path=<folder> or QWEN_IMAGE_EDIT_PATH=<folder>",
}
EDIT_PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")


def _with_hint(model: DictConfig, kind: str) -> DictConfig:
    return model if model.get("download_hint") else DictConfig({**model, "download_hint": HINTS[kind]})


@register_loader("qwen_image")
def _qwen_image(model: DictConfig):
    from diffusers import QwenImagePipeline

    return from_pretrained(QwenImagePipeline, _with_hint(model, "qwen_image"))


def _edit_pipeline_class(model: DictConfig):
    import diffusers

    name = str(model.get("pipeline_class") or "QwenImageEditPipeline")
    if name not in EDIT_PIPELINES:
        raise SetupError(f"model.pipeline_class={name!r}: use one of {', '.join(EDIT_PIPELINES)}")
    return getattr(diffusers, name)


@register_loader("qwen_image_edit")
def _qwen_image_edit(model: DictConfig):
    return from_pretrained(_edit_pipeline_class(model), _with_hint(model, "qwen_image_edit"))


def _tiny(model: DictConfig, kind: str, pipeline_class):
    """The random tiny pipeline ``kind``, saved to ``model.path`` on first use and loaded from there."""
    from hicache.testbeds.tiny.qwen_image import save_tiny_pipeline

    if not model.get("path"):
        raise SetupError(f"model={model.name} needs model.path=<folder to write the tiny pipeline to>")
    folder = Path(str(model.path)).expanduser()
    if not (folder / "model_index.json").is_file():
        logger.info("writing the tiny %s pipeline (seed %s) to %s", kind, model.get("seed", 0), folder)
        save_tiny_pipeline(kind, folder, seed=int(model.get("seed", 0)))
    return pipeline_class.from_pretrained(str(folder), torch_dtype=resolve_dtype(model.dtype))


@register_loader("tiny_qwen_image")
def _tiny_qwen_image(model: DictConfig):
    from diffusers import QwenImagePipeline

    return _tiny(model, "qwen_image", QwenImagePipeline)


@register_loader("tiny_qwen_image_edit")
def _tiny_qwen_image_edit(model: DictConfig):
    from diffusers import QwenImageEditPipeline

    return _tiny(model, "qwen_image_edit", QwenImageEditPipeline)


# ----------------------------------------------------------------------------- the generated edit set

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
             "bottom right": (0.72, 0.72), "center": (0.5, 0.5)}


def _draw_shape(draw, shape: str, centre: tuple[float, float], radius: float, colour) -> None:
    x, y = centre
    if shape == "circle":
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    elif shape == "square":
        draw.rectangle([x - radius, y - radius, x + radius, y + radius], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour)
    else:
        points = []
        for i in range(10):
            r = radius if i % 2 == 0 else radius * 0.45
            angle = np.pi / 2 + i * np.pi / 5
            points.append((x + r * np.cos(angle), y - r * np.sin(angle)))
        draw.polygon(points, fill=colour)


def edit_scene(rng: random.Random, size: int):
    """One procedural scene (a shape on a plain or striped background) and an instruction that edits it."""
    from PIL import Image, ImageDraw

    background, colour = rng.sample(sorted(COLOURS), 2)
    shape, position = rng.choice(SHAPES), rng.choice(sorted(POSITIONS))
    striped = rng.random() < 0.5
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    if striped:
        shade = tuple(int(c * 0.7) for c in COLOURS[background])
        for x in range(0, size, max(size // 8, 1)):
            draw.rectangle([x, 0, x + size // 16, size], fill=shade)
    cx, cy = POSITIONS[position]
    _draw_shape(draw, shape, (cx * size, cy * size), size * 0.16, COLOURS[colour])
    others = [c for c in sorted(COLOURS) if c not in (colour, background)]
    kind = rng.choice(("recolour", "reshape", "background", "add", "remove"))
    if kind == "recolour":
        instruction = f"make the {colour} {shape} {rng.choice(others)}"
    elif kind == "reshape":
        instruction = f"turn the {colour} {shape} into a {rng.choice([s for s in SHAPES if s != shape])}"
    elif kind == "background":
        instruction = f"change the background to {rng.choice(others)}"
    elif kind == "add":
        free = [p for p in sorted(POSITIONS) if p not in (position, "center")]
        instruction = f"add a small {rng.choice(others)} {rng.choice(SHAPES)} at the {rng.choice(free)}"
    else:
        instruction = f"remove the {colour} {shape}"
    return image, instruction


def edit_set(n: int, size: int, seed: int, folder: str | Path) -> list[tuple[str, str]]:
    """``n`` (instruction, input image path) pairs, the images written to ``folder`` once (PNG, lossless)."""
    from .outputs import _save_png

    folder = Path(folder).expanduser() / f"edit_set_seed{seed}_{size}px"
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        image, instruction = edit_scene(rng, size)
        path = folder / f"{i:04d}.png"
        if not path.is_file():
            _save_png(image, path)
        pairs.append((instruction, str(path)))
    index = folder / "edits.jsonl"
    if not index.is_file():
        index.write_text("".join(json.dumps({"image": Path(p).name, "instruction": t}) + "\n" for t, p in pairs))
    return pairs


def _from_edit_set(data: DictConfig) -> list[tuple[str, str]]:
    return edit_set(int(data.n), int(data.size), int(data.seed), str(data.folder))


def _from_edit_file(data: DictConfig) -> list[tuple[str, str]]:
    """Rows of ``data.file`` (.jsonl/.json/.csv/.tsv/.parquet) with an image path (relative to the file's folder,
    or absolute) in ``data.image_column`` and the instruction in ``data.column``."""
    if not data.get("file"):
        raise SetupError("data=edit_file needs data.file=<.jsonl/.csv with image and instruction columns>")
    path = Path(str(data.file)).expanduser()
    instructions = read_prompt_file(path, data.column)
    images = read_prompt_file(path, data.image_column)
    pairs = []
    for text, image in zip(instructions, images):
        image_path = Path(image).expanduser()
        image_path = image_path if image_path.is_absolute() else path.parent / image_path
        if not image_path.is_file():
            raise SetupError(f"data.file {path}: input image {image_path} does not exist")
        pairs.append((text, str(image_path)))
    return pairs


SOURCES["edit_set"] = _from_edit_set
SOURCES["edit_file"] = _from_edit_file


# ----------------------------------------------------------------------------- metric

@register_metric("clip_image")
def _clip_image(options: DictConfig, device: torch.device) -> Metric:
    """CLIP image similarity of the cached and the uncached output (100 * cosine of their image embeddings)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    from .metrics.quality import _require_hub_model

    name = str(options.get("model", "openai/clip-vit-large-patch14"))
    _require_hub_model(name, "the CLIP image similarity")
    scorer = CLIPScore(model_name_or_path=name).to(device)

    def as_tensor(image):
        return torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1).to(device)

    @torch.no_grad()
    def score(output, reference) -> float:
        return float(scorer(as_tensor(output), as_tensor(reference)).item())

    return Metric("clip_image", "fidelity", score)
