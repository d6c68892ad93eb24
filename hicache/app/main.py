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


def _check_variant_overrides(command_line: list[str], variant: str, variant_overrides: list[str]) -> None:
    """A command-line override of a key the variant also sets would be silently replaced by the variant's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    ours = {o.key_or_group.lstrip("+~"): o for o in parser.parse_overrides(variant_overrides)}
    for o in parser.parse_overrides(command_line):
        key = o.key_or_group.lstrip("+~")
        if key in ours and o.value() != ours[key].value():
            raise SetupError(f"{o.input_line} conflicts with variant={variant}, which sets {ours[key].input_line}; "
                             f"drop the override or pick another variant")


def apply_variant(cfg: DictConfig) -> DictConfig:
    return job_config(cfg)[0]


def job_config(cfg: DictConfig) -> tuple[DictConfig, str | None]:
    """The job's config with its variant's overrides applied, and the chosen cache group's name."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    variant = cfg.get("variant")
    if not variant:
        return cfg, hydra_cfg.runtime.choices.get("cache")
    variants = cfg.get("variants") or {}
    if variant not in variants:
        raise SetupError(f"variant={variant!r} is not in this experiment; known: {', '.join(variants)}")
    from hydra import compose
    from omegaconf import open_dict

    command_line = [o for o in hydra_cfg.overrides.task if not o.split("=", 1)[0].lstrip("+~") == "variant"]
    _check_variant_overrides(command_line, variant, list(variants[variant]))
    composed = compose(config_name="run", overrides=list(hydra_cfg.overrides.task) + list(variants[variant]),
                       return_hydra_config=True)
    group = composed.hydra.runtime.choices.get("cache")
    with open_dict(composed):
        del composed["hydra"]
    return composed, group


def checked_job_config(cfg: DictConfig) -> DictConfig:
    """`job_config`, then every check of `hicache.app.checks` that needs only the config."""
    from .checks import check_config, group_method

    cfg, group = job_config(cfg)
    check_config(cfg, group, group_method(group))
    return cfg


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

        return run(checked_job_config(cfg))
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
