"""Where a finished run is reported besides its folder: Weights & Biases, or nowhere.

W&B runs offline by default, so no account or network is needed; `wandb sync <dir>` uploads later.
Only rank 0 logs, once the run's outputs are merged: config, per-output metrics (a table and one
step per output), the summary, and a grid of outputs next to their references.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image


class NullLogger:
    def log_run(self, **kwargs) -> None:
        pass


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((width, height)), ((i % columns) * width, (i // columns) * height))
    return grid


class WandbLogger:
    def __init__(self, options: DictConfig):
        self.options = options

    def log_run(self, *, config: DictConfig, run_dir: Path, name: str, group: str, records: list[dict],
                summary: dict[str, Any], pairs: list[tuple[Image.Image, Image.Image]]) -> None:
        import os

        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        o = self.options
        run = wandb.init(
            project=o.project, entity=o.get("entity"), mode=o.mode, dir=str(run_dir), name=name, group=group,
            job_type=o.get("job_type"), tags=list(o.get("tags") or []),
            config=OmegaConf.to_container(config, resolve=True), reinit="finish_previous",
        )
        try:
            columns = sorted({k for r in records for k in r})
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in records])
            for record in records:
                run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=int(record["index"]))
            run.log({"per_output": table})
            if pairs and not isinstance(pairs[0][0], Image.Image):  # videos: cached | reference, side by side
                from .video import wandb_videos

                run.log({"videos": wandb_videos(pairs[: int(o.get("grid_size", 8))], run_dir)})
            elif pairs:
                shown = pairs[: int(o.get("grid_size", 8))]
                grid = image_grid([im for pair in shown for im in pair], columns=2)
                run.log({"grid": wandb.Image(grid, caption="left: cached, right: uncached reference")})
            run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        finally:
            run.finish()


def build_logger(options: DictConfig):
    kind = options.get("kind", "none")
    if kind == "none":
        return NullLogger()
    if kind == "wandb":
        return WandbLogger(options)
    raise ValueError(f"logger.kind={kind!r} is unknown (wandb or none)")
