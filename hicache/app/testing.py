"""Run the app in-process from a list of overrides, as `python run.py <overrides>` would.

For tests and notebooks: Hydra's compose API builds the same config as the command line, and the
variants of an experiment run one by one, as `python run.py -m experiment=...` runs them.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Overrides that make any experiment a seconds-long smoke run on the random tiny FLUX pipeline.
TINY_OVERRIDES = (
    "model=tiny_flux", "data=tiny_words", "data.limit=2", "sampling.steps=4", "sampling.height=16",
    "sampling.width=16", "metrics=fidelity", "logger=none", "speed.warmup=false", "speed.flops=false",
    "speed.latency_pairs=1",
)


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed config of ``run.py``, with the hydra node set up as `@hydra.main` would."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from .main import register_resolvers

    register_resolvers()
    cfg = compose(config_name="run", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_overrides(overrides: list[str], all_variants: bool = False) -> list[dict]:
    """Run one job (or, with ``all_variants``, every variant of the experiment); the summaries."""
    from hydra import initialize_config_dir

    from .main import main

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        variants = list(compose_config(overrides).get("variants") or {}) if all_variants else [None]
        summaries = []
        for variant in variants:
            job = list(overrides) + ([f"variant={variant}"] if variant else [])
            summaries.append(main(compose_config(job)))
        return summaries
