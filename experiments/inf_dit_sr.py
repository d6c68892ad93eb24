"""Hydra entry point of the Inf-DiT SR table (see hicache/models/inf_dit/sr_experiment.py)."""

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from hicache.models.inf_dit.sr_experiment import (SRSetupError, load_hr_images, load_sr_pipeline, resolve_variants,
                                                  run_table, testbed_data_source)

logger = logging.getLogger(__name__)


@hydra.main(config_path="inf_dit_conf", config_name="sr", version_base=None)
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))
    try:
        pipe = load_sr_pipeline(cfg.model.kind, cfg.model.path, cfg.model.dtype, cfg.model.device)
        heldout = testbed_data_source(cfg.model.path) if cfg.model.kind == "testbed" else "photos"
        images = load_hr_images(cfg.data.source, cfg.data.n, cfg.data.folder, cfg.data.size,
                                pipe.transformer.config.image_block_size, heldout)
        logger.info("HR images: %d from %s", len(images), heldout if cfg.data.source == "heldout" else cfg.data.source)
        variants = resolve_variants(OmegaConf.to_container(cfg.variants), int(cfg.steps))
        rows = run_table(pipe, images, variants, int(cfg.seed), bool(cfg.metrics.lpips), Path(cfg.out_dir),
                         int(cfg.save_images))
    except SRSetupError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print((Path(cfg.out_dir) / "results.md").read_text())
    logger.info("results in %s", cfg.out_dir)
    return rows


if __name__ == "__main__":
    main()
