"""Hydra entry point: train the Inf-DiT SR testbed (see hicache/models/inf_dit/sr_testbed.py)."""

import json
import logging
import shutil
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from hicache.models.inf_dit.sr_testbed import DataConfig, SRTestbedConfig, TrainConfig, train

logger = logging.getLogger(__name__)


@hydra.main(config_path="../conf/train", config_name="inf_dit_sr_testbed", version_base=None)
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))
    train_cfg = TrainConfig(**OmegaConf.to_container(cfg.train), model=SRTestbedConfig(**OmegaConf.to_container(cfg.model)),
                            data=DataConfig(**OmegaConf.to_container(cfg.data)))
    out = Path(cfg.out_dir)
    meta = train(train_cfg, out, log=lambda metrics, step: logger.info("step %d %s", step, metrics))
    print(json.dumps({k: meta[k] for k in ("gate", "cross_domain_photos") if k in meta}, indent=2))
    if cfg.export_dir:
        shutil.copytree(out, cfg.export_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("_hydra"))
        logger.info("exported the testbed to %s", cfg.export_dir)


if __name__ == "__main__":
    main()
