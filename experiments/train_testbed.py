"""Train the testbed FLUX pipeline (Hydra entry point; config in conf/train/testbed.yaml).

    python experiments/train_testbed.py                      # full run, about an hour on 2 CPU cores
    python experiments/train_testbed.py max_steps=2 out_dir=/tmp/smoke wandb.mode=disabled
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from hicache.testbed.train import run

logger = logging.getLogger("train_testbed")


@hydra.main(config_path="../conf/train", config_name="testbed", version_base=None)
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import wandb

    wb = wandb.init(
        project=cfg.wandb.project, mode=cfg.wandb.mode, dir=str(out_dir),
        config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous",
    )

    def log(metrics: dict[str, float], step: int) -> None:
        logger.info("step %d %s", step, " ".join(f"{k}={v:.5g}" for k, v in metrics.items()))
        stage = next(iter(metrics)).split("/")[0]
        wb.log({**metrics, f"{stage}/step": step})

    results = run(cfg, out_dir, log)
    wb.summary.update(results)
    wb.finish()
    if cfg.export_dir:
        export = Path(hydra.utils.to_absolute_path(cfg.export_dir))
        if export.exists():
            shutil.rmtree(export)
        shutil.copytree(out_dir / "pipeline", export)
        logger.info("exported the trained pipeline to %s", export)
    logger.info("done: %s", {k: round(v, 4) for k, v in results.items()})


if __name__ == "__main__":
    main()
