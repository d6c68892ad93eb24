"""Training runs behind `run.py` (`experiment=testbed_train`, `experiment=inf_dit_sr_testbed_train`, and the LESA
predictors, `experiment=*_lesa_train`, in `hicache.app.lesa_train`).

Training a testbed is an experiment like any other: composed by Hydra from the `train` group, written under
`outputs/<name>/`, and exported into the shipped weights folder only when asked (`train.export_dir`). The trainers
themselves live with their testbeds (`hicache.testbeds.*.train`); this module only wires config, logging and export.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .errors import SetupError
from .files import umask

logger = logging.getLogger(__name__)


def run_train(cfg: DictConfig) -> dict:
    """Train the testbed named by `train.kind`; returns its final measurements."""
    trainers = {"flux_shapes": _train_flux_shapes, "inf_dit_sr": _train_inf_dit_sr}
    kind = cfg.train.get("kind")
    if kind == "lesa":  # a predictor for a model's cache, not a testbed: it needs the whole config
        from .lesa_train import run_lesa_train

        torch.set_num_threads(int(cfg.train.threads))
        return run_lesa_train(cfg)
    if kind not in trainers:
        raise SetupError(f"train.kind={kind!r} is not a testbed; known: {', '.join(trainers)}")
    torch.set_num_threads(int(cfg.train.threads))
    return trainers[kind](cfg.train)


def _export(source: Path, export_dir: str | None, ignore=None) -> None:
    if not export_dir:
        return
    export = Path(export_dir)
    if export.exists():
        shutil.rmtree(export)
    shutil.copytree(source, export, ignore=ignore)
    mode = 0o666 & ~umask()
    for path in export.rglob("*"):  # safetensors writes 0600: shipped weights must be readable by everyone who may
        if path.is_file():
            path.chmod(mode)
    logger.info("exported the trained testbed to %s", export)


def _train_flux_shapes(cfg: DictConfig) -> dict:
    import wandb

    from hicache.testbeds.flux_shapes.train import run, stage_configs

    try:  # a bad knob stops in one line, before a W&B run or a model exists
        stage_configs(cfg)
    except ValueError as err:
        raise SetupError(f"train: {err}") from err
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wb = wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode, dir=str(out_dir),
                    config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")

    def log(metrics: dict[str, float], step: int) -> None:
        logger.info("step %d %s", step, " ".join(f"{k}={v:.5g}" for k, v in metrics.items()))
        stage = next(iter(metrics)).split("/")[0]
        wb.log({**metrics, f"{stage}/step": step})

    results = run(cfg, out_dir, log)
    wb.summary.update(results)
    wb.finish()
    _export(out_dir / "pipeline", cfg.export_dir)
    logger.info("done: %s", {k: round(v, 4) for k, v in results.items()})
    return results


def _train_inf_dit_sr(cfg: DictConfig) -> dict:
    from hicache.testbeds.inf_dit_sr.train import DataConfig, SRTestbedConfig, TrainConfig, train

    container = OmegaConf.to_container(cfg, resolve=True)
    train_cfg = TrainConfig(**container["trainer"], model=SRTestbedConfig(**container["model"]),
                            data=DataConfig(**container["data"]))
    out = Path(cfg.out_dir)
    meta = train(train_cfg, out, log=lambda metrics, step: logger.info("step %d %s", step, metrics))
    print(json.dumps({k: meta[k] for k in ("gate", "cross_domain_photos") if k in meta}, indent=2))
    _export(out, cfg.export_dir, ignore=shutil.ignore_patterns("_hydra"))
    return meta
