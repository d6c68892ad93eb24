"""What a pipeline call produces and how it is stored: one `OutputKind` per ``model.output``.

Images are the default; a video model registers its own kind (frames, an mp4 writer) here and the
runner, reference store and results writer use it unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from .files import temp_file


@dataclass(frozen=True)
class OutputKind:
    suffix: str
    extract: Callable[[Any], Any]           # pipeline result -> one output object
    save: Callable[[Any, Path], None]
    load: Callable[[Path], Any]


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, ".tmp.png")
    os.close(fd)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _load_png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


OUTPUT_KINDS: dict[str, OutputKind] = {
    "image": OutputKind(".png", lambda result: result.images[0], _save_png, _load_png),
}


def output_kind(name: str) -> OutputKind:
    if name not in OUTPUT_KINDS:
        raise ValueError(f"model.output={name!r} is unknown; known: {', '.join(sorted(OUTPUT_KINDS))}")
    return OUTPUT_KINDS[name]
