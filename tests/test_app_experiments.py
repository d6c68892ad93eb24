"""Every experiment config: each variant's overrides are valid and attach, and a smoke run renders a table.

Every variant of every experiment is checked cheaply (its overrides applied to its cache group's
YAML, the cache attached to a tiny transformer); then each experiment runs end to end on the random
tiny FLUX pipeline with 2 prompts and 4 steps (`TINY_OVERRIDES`): the table experiments with one
variant per method, the others with one variant, so every method's path runs once per model family.
"""

from types import SimpleNamespace

import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from hicache.app.caching import attach
from hicache.app.testing import CONF_DIR, TINY_OVERRIDES, compose_config, run_overrides
from hicache.app.tables import render
from hicache.testbeds.tiny.flux import tiny_flux_transformer

FAMILIES = ("flux", "testbed")
KINDS = ("hicache", "table", "ablation_sigma", "ablation_order", "ablation_interval", "ablation_clusca")
EXPERIMENTS = [f"{family}_{kind}" for family in FAMILIES for kind in KINDS]


def experiment_yaml(name: str) -> dict:
    return yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text())


def cache_config_of(overrides: list[str]):
    """The `cache` node a variant's overrides produce: its cache group YAML with its cache.* values set."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    group = next(o.value() for o in parsed if o.key_or_group == "cache")
    node = OmegaConf.load(CONF_DIR / "cache" / f"{group}.yaml")
    for o in parsed:
        if o.key_or_group.startswith("cache."):
            key = o.key_or_group.removeprefix("cache.")
            assert key in node, f"{key} is not a field of cache/{group}.yaml"
            OmegaConf.update(node, key, o.value())
    return node


def test_every_experiment_has_a_config():
    assert sorted(EXPERIMENTS) == sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")
                                         if p.stem.startswith(FAMILIES) and not p.stem.endswith(("_train", "_lesa")))  # LESA: test_lesa_app.py


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_variant_is_explicit_valid_and_attaches(experiment):
    spec = experiment_yaml(experiment)
    assert spec["name"] == experiment
    assert set(spec["sampling"]) == {"steps", "height", "width", "guidance_scale", "seed_offset"}
    variants = spec.get("variants") or {}
    if variants:
        swept = spec["hydra"]["sweeper"]["params"]["variant"].split(",")
        assert swept == list(variants) and spec["variant"] in variants
    pipe = SimpleNamespace(transformer=tiny_flux_transformer(), current_timestep=None)
    model = OmegaConf.create({"recipe": "flux"})
    [group] = [d["override /cache"] for d in spec["defaults"] if isinstance(d, dict) and "override /cache" in d]
    caches = [cache_config_of(o) for o in variants.values()] or [OmegaConf.load(CONF_DIR / "cache" / f"{group}.yaml")]
    for cache in caches:
        if cache.method not in ("none", "step_reduction"):
            assert {"interval", "warmup", "order"} <= set(cache)  # every value explicit
        attached = attach(pipe, cache, model, spec["sampling"]["steps"])
        try:
            expected = 9 if cache.method == "step_reduction" else 50  # N=7, W=3 on 50 steps: 9 full steps
            assert attached.steps == expected
        finally:
            attached.detach()


def smoke_variants(experiment: str) -> list[str | None]:
    spec = experiment_yaml(experiment)
    variants = spec.get("variants") or {}
    if not variants:
        return [None]
    if experiment.endswith(("_table", "_sigma", "_clusca")):
        chosen, methods = [], set()
        for name, overrides in variants.items():
            method = next(o.split("=", 1)[1] for o in overrides if o.startswith("cache="))
            if method not in methods and not (experiment.endswith("_sigma") and method == "hicache") \
                    and not (experiment.endswith("_clusca") and method not in ("clusca", "hi_clusca")):
                methods.add(method)
                chosen.append(name)
        return chosen
    return [spec["variant"]]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_smoke_run_and_table(experiment, tmp_path):
    base = [*TINY_OVERRIDES, f"experiment={experiment}", f"paths.outputs={tmp_path}"]
    jobs = [base + ([f"variant={v}"] if v else []) for v in smoke_variants(experiment)]
    summaries = [s for job in jobs for s in run_overrides(job)]
    assert [s["num_outputs"] for s in summaries] == [2] * len(jobs)
    assert all(s["experiment"] == experiment for s in summaries)
    table = render(tmp_path / experiment)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    assert len(rows) == len(jobs)
    for s in summaries:
        assert s["psnr"] > 0 and 0 < s["ssim"] <= 1
        if s["method"] == "none":
            assert s["psnr"] == float("inf")  # the uncached run is bit-identical to its reference


def test_command_line_overrides_beat_the_experiment(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose_config(["experiment=flux_hicache", "cache.sigma=0.7", "model=tiny_flux"])
    assert cfg.cache.sigma == 0.7 and cfg.model.name == "tiny_flux" and cfg.sampling.height == 1024
