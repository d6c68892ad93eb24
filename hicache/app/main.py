"""The Hydra entry point behind `run.py`: variants, the one-line setup errors, and the run itself.

A *variant* is a named list of Hydra overrides kept in an experiment config (``variants``); the
experiment sweeps ``variant`` with Hydra's basic sweeper, and each job composes the config again
with its variant's overrides appended to the command line's. This is how one multirun holds rows
that differ in more than one field (the baseline with fewer steps, FORA, TaylorSeer, HiCache at
several intervals), which a Cartesian sweep cannot express.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import SetupError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def register_resolvers() -> None:
    """``${hicache_weights:}``: the shipped testbed weights (inside the installed package, so they resolve from any
    working directory and from a non-editable install); ``${hicache_root:}``: the checkout's root."""
    from hicache.testbeds import WEIGHTS_DIR

    if not OmegaConf.has_resolver("hicache_root"):
        OmegaConf.register_new_resolver("hicache_root", lambda: str(REPO_ROOT))
    if not OmegaConf.has_resolver("hicache_weights"):
        OmegaConf.register_new_resolver("hicache_weights", lambda: str(WEIGHTS_DIR))


def apply_variant(cfg: DictConfig) -> DictConfig:
    variant = cfg.get("variant")
    if not variant:
        return cfg
    variants = cfg.get("variants") or {}
    if variant not in variants:
        raise SetupError(f"variant={variant!r} is not in this experiment; known: {', '.join(variants)}")
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) + list(variants[variant])
    return compose(config_name="run", overrides=overrides)


def main(cfg: DictConfig) -> dict:
    """Run one job; a `SetupError` prints one line and exits with status 2."""
    try:
        if cfg.get("train") is not None:  # experiment=*_train: train a testbed
            from .training import run_train

            return run_train(cfg)
        if cfg.get("collect") is not None:  # experiment=collect_features: record trajectories, no caching
            from .collect import run_collect

            return run_collect(apply_variant(cfg))
        if cfg.get("sr") is not None:  # experiment=infdit_*: the super-resolution table, every row in one job
            from .super_resolution import run_sr

            return run_sr(cfg)
        if cfg.model.get("output") == "sr":
            raise SetupError(f"model={cfg.model.name} is a super-resolution model: run it with experiment=infdit_table "
                             "or experiment=infdit_sigma")
        from .runner import run

        return run(apply_variant(cfg))
    except BaseException as err:
        from .pipelines import forget_pipelines

        forget_pipelines()  # a failed job may leave hooks on the kept pipeline
        if isinstance(err, SetupError):
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        raise


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


LAUNCHER_PLUGINS = {"submitit": "hydra_plugins.hydra_submitit_launcher"}


def check_launcher(argv: list[str]) -> None:
    """Hydra launchers are plugins; name the missing package in one line instead of a composition error."""
    for arg in argv:
        if arg.startswith(("hydra/launcher=", "+hydra/launcher=")):
            for key, module in LAUNCHER_PLUGINS.items():
                if key in arg.split("=", 1)[1] and not _importable(module):
                    print(f"error: {arg} needs the hydra-{key}-launcher package: pip install hydra-{key}-launcher",
                          file=sys.stderr)
                    sys.exit(2)
