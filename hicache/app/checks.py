"""Check a composed run config before any work, so that a run does what its name and table row say.

Each problem is one `SetupError` naming the override to change; nothing here loads a model. The
checks that need the pipeline (the image size it can produce) are in `check_size`, called right
after loading and before the run folder is claimed.

- the cache group decides the method: an experiment or an override may set the group's values
  (interval, sigma, ...) but not turn ``cache=fora`` into HiCache under FORA's name and label;
- every ``cache.*`` key is one the cache family reads (``+cache.sigmma=0.3`` is a typo, not a no-op);
- the hicache-family values build a `hicache.CacheConfig` (its `ValueError` becomes the one line);
- ``sampling.*`` and ``data.limit`` are positive integers where they count something.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import SetupError

# What every cache family reads besides its own fields (the table row's columns and the run's name).
ROW_KEYS = ("family", "method", "label", "name", "interval", "warmup", "order", "sigma")
FAMILY_KEYS = {
    "hicache": ("full_steps", "final_full_steps", "factor_dtype", "analytic_alpha", "analytic_sigma_max",
                "analytic_beta", "analytic_eps", "clusters", "propagation", "seed"),
    "diffusers": ("config_class", "config"),
    "step_reduction": (),
}


def check_cache_group(cache: DictConfig, group: str | None, group_method: str | None) -> None:
    """``cache.method`` must be the method of the chosen ``cache=<group>``."""
    if group is None or group_method is None:
        return
    if cache.get("method") != group_method:
        raise SetupError(
            f"cache.method={cache.get('method')} does not match cache={group} (whose method is {group_method}): "
            f"an experiment or override may not change the cache group's method; choose the group instead "
            f"(e.g. cache={cache.get('method')}) and remove the cache.method setting")


def check_cache_keys(cache: DictConfig) -> None:
    family = cache.get("family", "hicache")
    if family not in FAMILY_KEYS:
        raise SetupError(f"cache.family={family!r} is unknown; known: {', '.join(sorted(FAMILY_KEYS))}")
    known = set(ROW_KEYS) | set(FAMILY_KEYS[family])
    unknown = sorted(set(cache.keys()) - known)
    if unknown:
        raise SetupError(f"cache.{unknown[0]} is not a setting of the {family} cache family; known keys: "
                         f"{', '.join(sorted(known))}")


def _positive_int(value: Any, key: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = "a positive integer" + (" or null" if allow_none else "")
        raise SetupError(f"{key}={value!r} must be {what}")


def check_sampling(cfg: DictConfig) -> None:
    s = cfg.sampling
    for key in ("steps", "height", "width"):
        _positive_int(s.get(key), f"sampling.{key}")
    _positive_int(cfg.data.get("limit"), "data.limit", allow_none=True)


def check_hicache_values(cache: DictConfig, steps: int, model: DictConfig | None = None) -> None:
    """Build the `hicache.CacheConfig` the run will attach (loading a LESA predictor too), so a bad value or a
    missing predictor fails before any work."""
    if cache.get("family", "hicache") != "hicache":
        return
    from .caching import hicache_config

    hicache_config(cache, steps, model)


def check_config(cfg: DictConfig, group: str | None = None, group_method: str | None = None) -> None:
    """Every check that needs only the composed config (see the module docstring)."""
    check_sampling(cfg)
    check_cache_keys(cfg.cache)
    check_cache_group(cfg.cache, group, group_method)
    check_hicache_values(cfg.cache, int(cfg.sampling.steps), cfg.model)


def size_multiple(pipe) -> int | None:
    """The multiple of which the pipeline's height and width must be, if it is known.

    FLUX packs 2x2 latent patches, so 2 * vae_scale_factor (16 for FLUX.1); video pipelines scale
    by their spatial VAE factor times the transformer's patch size.
    """
    vae = getattr(pipe, "vae_scale_factor", None)
    if vae is not None and type(pipe).__name__.startswith("Flux"):
        return int(vae) * 2
    spatial = getattr(pipe, "vae_scale_factor_spatial", None)
    if spatial is not None:
        patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", 1) or 1
        return int(spatial) * int(patch)
    return int(vae) if vae is not None else None


def check_size(pipe, cfg: DictConfig) -> None:
    multiple = size_multiple(pipe)
    if not multiple:
        return
    for key in ("height", "width"):
        value = int(cfg.sampling[key])
        if value % multiple:
            fixed = max(multiple, round(value / multiple) * multiple)
            raise SetupError(f"sampling.{key}={value} is not a multiple of {multiple}, which {type(pipe).__name__} "
                             f"needs (it would render another size); use e.g. sampling.{key}={fixed}")


def check_output_size(output: Any, cfg: DictConfig) -> None:
    """An image output must have the size the run is labelled with (a safety net behind `check_size`)."""
    size = getattr(output, "size", None)
    if not isinstance(size, tuple):
        return
    want = (int(cfg.sampling.width), int(cfg.sampling.height))
    if size != want:
        raise SetupError(f"the pipeline rendered {size[0]}x{size[1]} images for sampling.width={want[0]} "
                         f"sampling.height={want[1]}; pick a size the model supports")


def group_method(group: str | None) -> str | None:
    """The method the cache group ``group`` declares, composed on its own (no experiment, no override)."""
    if not group:
        return None
    from hydra import compose

    alone = compose(config_name="run", overrides=[f"cache={group}"])
    return OmegaConf.select(alone, "cache.method")
