"""Where a finished run is reported besides its folder: Weights & Biases, or nowhere.

W&B runs offline by default, so no account or network is needed; `wandb sync <dir>` uploads later.
Only rank 0 logs: each output's metrics as it is rendered (one step per output, so a long run can
be watched), then, once every shard is merged, the per-output table, the summary, and a grid of
outputs next to their references.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image


class NullLogger:
    def start(self, **kwargs) -> None:
        pass

    def log_output(self, record: dict[str, Any]) -> None:
        pass

    def log_run(self, **kwargs) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((width, height)), ((i % columns) * width, (i // columns) * height))
    return grid


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbLogger:
    def __init__(self, options: DictConfig):
        self.options = options
        self.run = None
        self.logged: set[int] = set()

    def start(self, *, config: DictConfig, run_dir: Path, name: str, group: str) -> None:
        import os

        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        o = self.options
        self.run = wandb.init(
            project=o.project, entity=o.get("entity"), mode=o.mode, dir=str(run_dir), name=name, group=group,
            job_type=o.get("job_type"), tags=list(o.get("tags") or []),
            config=OmegaConf.to_container(config, resolve=True), reinit="finish_previous",
        )

    def log_output(self, record: dict[str, Any]) -> None:
        """One output's metrics, as soon as it is rendered (W&B step = the prompt's index)."""
        step = int(record["index"])
        if self.run is None or (self.logged and step <= max(self.logged)):
            return  # W&B steps only increase; the final table has every output anyway
        self.run.log(_numbers(record), step=step)
        self.logged.add(step)

    def close(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None

    def log_run(self, *, config: DictConfig, run_dir: Path, name: str, group: str, records: list[dict],
                summary: dict[str, Any], pairs: list[tuple[Image.Image, Image.Image]]) -> None:
        import wandb

        o = self.options
        if self.run is None:
            self.start(config=config, run_dir=run_dir, name=name, group=group)
        run = self.run
        try:
            columns = sorted({k for r in records for k in r})
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in records])
            for record in records:  # outputs rendered by other ranks or an earlier, interrupted attempt
                self.log_output(record)
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
            self.close()


def build_logger(options: DictConfig):
    kind = options.get("kind", "none")
    if kind == "none":
        return NullLogger()
    if kind == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            from .errors import SetupError

            raise SetupError("logger=wandb needs the wandb package: pip install wandb (or run with logger=none)")
        return WandbLogger(options)
    raise ValueError(f"logger.kind={kind!r} is unknown (wandb or none)")
