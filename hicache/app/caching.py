"""Attach the configured acceleration to a pipeline: a hicache method, a diffusers cache, or fewer steps.

A cache config has a ``family``:

- ``hicache``: `hicache.CacheConfig` fields (method none/fora/taylorseer/hicache/hi_taylor/
  hicache_analytic/clusca/hi_clusca, interval, warmup, order, sigma, clusters, propagation, seed, ...)
  and the model's recipe;
- ``diffusers``: one of diffusers' own caches, applied with ``transformer.enable_cache(<Config>)``
  (``config`` holds the keyword arguments of the diffusers config class named by ``config_class``);
- ``step_reduction``: no cache, but as many plain steps as the schedule (interval, warmup) runs
  in full: the equal-cost baseline (`hicache.schedule.same_cost_steps`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

import hicache
from hicache.schedule import Schedule, same_cost_steps

from .errors import SetupError

# every `hicache.CacheConfig` field a cache config may set (a new method's fields come with it)
HICACHE_FIELDS = tuple(f.name for f in dataclasses.fields(hicache.CacheConfig)
                       if f.init and f.name != "num_inference_steps")  # the step count is sampling.steps


@dataclass
class AttachedCache:
    """What was attached, how many steps to run with it, and how to take it off again."""

    steps: int
    detach: Callable[[], None]
    describe: Callable[[], dict[str, Any]] = field(default=lambda: {})
    uncached: bool = False  # nothing attached and every step run: the run *is* the uncached pipeline


def is_uncached(cache: DictConfig) -> bool:
    """True for the "original" row: nothing attached, every step run in full."""
    return cache.get("family", "hicache") == "hicache" and cache.get("method") == "none"


def attach(pipe, cache: DictConfig, model: DictConfig, steps: int) -> AttachedCache:
    family = cache.get("family", "hicache")
    if family not in ATTACHERS:
        raise SetupError(f"cache.family={family!r} is unknown; known: {', '.join(sorted(ATTACHERS))}")
    return ATTACHERS[family](pipe, cache, model, steps)


def hicache_config(cache: DictConfig, steps: int, model: DictConfig | None = None) -> hicache.CacheConfig:
    """The `hicache.CacheConfig` of a hicache-family cache config; its one-line `ValueError` becomes a `SetupError`."""
    fields = {k: cache[k] for k in HICACHE_FIELDS if k in cache and cache[k] is not None}
    for key in ("full_steps", "extra_full_steps"):
        if key in fields:
            fields[key] = list(fields[key])
    if fields.get("method") == "lesa":
        fields["predictor"] = _lesa_predictor(cache, model if model is not None else {})
        try:
            return hicache.CacheConfig(**fields, num_inference_steps=steps)
        except ValueError as err:  # a predictor trained for another N or step count
            raise SetupError(f"cache.predictor={cache.predictor}: {err}") from None
    try:
        return hicache.CacheConfig(**fields, num_inference_steps=steps)
    except (ValueError, TypeError) as err:
        raise SetupError(f"cache ({cache.get('method')}): {err}") from None


def cache_config(cache: DictConfig, steps: int, model: DictConfig | None = None) -> hicache.CacheConfig:
    """`hicache_config`, or method none for the caches of the other families (for the memory check)."""
    if cache.get("family", "hicache") != "hicache":
        return hicache.CacheConfig("none", num_inference_steps=steps)
    return hicache_config(cache, steps, model)


def _attach_hicache(pipe, cache: DictConfig, model: DictConfig, steps: int) -> AttachedCache:
    config = hicache_config(cache, steps, model)
    transformer = pipe.transformer
    try:  # a method the model's recipe cannot run (clusca without fresh tokens): one line
        # applied to the pipeline: its scheduler tells the step hook where a call starts (no timestep read-back)
        hicache.apply_cache(pipe, config, recipe=model.get("recipe", "flux"))
    except ValueError as err:
        raise SetupError(f"cache={cache.get('method')}, model {model.get('name')}: {err}") from None

    def describe() -> dict[str, Any]:
        summary = hicache.cache_summary(transformer, steps)
        return {"full_steps": summary.full_steps, "ideal_speedup": summary.ideal_speedup,
                "cache_mib": summary.cache_bytes / 2**20,
                **({"fresh_modules": len(summary.fresh_tokens["fresh_modules"])} if summary.fresh_tokens else {})}

    return AttachedCache(steps, lambda: hicache.remove_cache(transformer), describe, uncached=config.method == "none")


def _lesa_predictor(cache: DictConfig, model: DictConfig):
    """The LESA predictor of ``cache.predictor`` (a folder), or a one-line error saying how to make one."""
    from hicache.lesa import load_predictor

    path = cache.get("predictor")
    hint = cache.get("predictor_hint") or "train one with `python run.py experiment=testbed_lesa_train`"
    if not path:
        raise SetupError(f"cache=lesa needs cache.predictor=<folder of a trained LESA predictor>; {hint}")
    try:
        return load_predictor(path)
    except ValueError as err:
        raise SetupError(f"model {model.get('name')}, LESA N={cache.interval}: {err}; {hint}") from None


def _attach_step_reduction(pipe, cache: DictConfig, model: DictConfig, steps: int) -> AttachedCache:
    try:
        schedule = Schedule(interval=int(cache.interval), warmup=int(cache.warmup))
        fewer = same_cost_steps(steps, schedule)
    except (ValueError, TypeError) as err:
        raise SetupError(f"cache (step_reduction): {err}") from None
    return AttachedCache(fewer, lambda: None,
                         lambda: {"full_steps": list(range(fewer)), "ideal_speedup": steps / fewer})


def _diffusers_config(pipe, cache: DictConfig, steps: int):
    import diffusers

    cls = getattr(diffusers, cache.config_class, None)
    if cls is None:
        raise SetupError(f"diffusers {diffusers.__version__} has no {cache.config_class}; upgrade diffusers")
    kwargs = OmegaConf.to_container(cache.get("config") or {}, resolve=True)
    if cache.config_class == "MagCacheConfig":
        if kwargs.get("mag_ratios") == "flux":
            from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

            kwargs["mag_ratios"] = FLUX_MAG_RATIOS
        kwargs["num_inference_steps"] = steps
    if cache.config_class == "PyramidAttentionBroadcastConfig":
        kwargs["current_timestep_callback"] = lambda: pipe.current_timestep
        for key, value in list(kwargs.items()):
            if key.endswith("timestep_skip_range") or key.endswith("identifiers"):
                kwargs[key] = tuple(value)
    if "taylor_factors_dtype" in kwargs:
        import torch

        kwargs["taylor_factors_dtype"] = getattr(torch, kwargs["taylor_factors_dtype"])
    return cls(**kwargs)


def _attach_diffusers(pipe, cache: DictConfig, model: DictConfig, steps: int) -> AttachedCache:
    transformer = pipe.transformer
    transformer.enable_cache(_diffusers_config(pipe, cache, steps))
    return AttachedCache(steps, transformer.disable_cache, lambda: {})


ATTACHERS: dict[str, Callable[..., AttachedCache]] = {
    "hicache": _attach_hicache,
    "diffusers": _attach_diffusers,
    "step_reduction": _attach_step_reduction,
}
