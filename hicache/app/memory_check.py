"""Will the run fit the accelerator? Asked after the weights are read (to the CPU), before they move to it.

`hicache.estimate_memory` predicts the cache's factors and a full step's activations from a meta twin of
the transformer; the pipeline's weights are counted as they will sit on the device (all of them, or with
``model.cpu_offload`` the largest component at a time). If the sum exceeds the device's memory
(``model.memory_limit_gib``, else a CUDA device's total) the run stops with one line naming the numbers
and what to change, instead of an out-of-memory error some minutes into the first render.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, OmegaConf

import hicache
from hicache.memory import GiB, INPUT_BUILDERS, format_bytes

from .caching import cache_config
from .errors import SetupError

logger = logging.getLogger(__name__)

_ESTIMATES: dict[str, hicache.MemoryEstimate] = {}  # a multirun's jobs share a process: estimate once per setting


def component_bytes(pipe) -> dict[str, int]:
    """Bytes of every `torch.nn.Module` component of a pipeline (parameters and buffers)."""
    return {name: sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
            for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def device_capacity(model: DictConfig, device: torch.device) -> int | None:
    limit = model.get("memory_limit_gib")
    if limit is not None:
        return int(float(limit) * GiB)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def estimate_run(pipe, cfg: DictConfig, cache: DictConfig | None = None) -> hicache.MemoryEstimate | None:
    """The memory estimate of sampling ``cfg.sampling``'s shape with ``cache`` (default ``cfg.cache``)."""
    model, sampling = cfg.model, cfg.sampling
    recipe = model.get("recipe", "flux")
    if recipe not in INPUT_BUILDERS or not hasattr(pipe, "transformer"):
        logger.warning("no memory estimate for recipe %r (no input builder): the run is not checked to fit", recipe)
        return None
    config = cache_config(cache if cache is not None else cfg.cache, int(sampling.steps))
    call = OmegaConf.to_container(model.get("call_kwargs") or {}, resolve=True)
    key = OmegaConf.to_yaml(OmegaConf.create({"model": model, "sampling": sampling, "cache": str(config)}))
    if key not in _ESTIMATES:
        _ESTIMATES[key] = hicache.estimate_memory(
            pipe.transformer, config, recipe, height=int(sampling.height), width=int(sampling.width),
            frames=call.get("num_frames"), text_tokens=call.get("max_sequence_length"),
            vae_scale_factor=getattr(pipe, "vae_scale_factor_spatial", getattr(pipe, "vae_scale_factor", 8)),
            vae_temporal_factor=getattr(pipe, "vae_scale_factor_temporal", 4))
    return _ESTIMATES[key]


def check_fits(pipe, cfg: DictConfig, device: torch.device) -> None:
    """A `SetupError` if weights + cache + activations exceed the device (see the module's docstring)."""
    capacity = device_capacity(cfg.model, device)
    if capacity is None:
        return
    estimate = estimate_run(pipe, cfg)
    if estimate is None:
        return
    sizes = component_bytes(pipe)
    offload = cfg.model.get("cpu_offload", False)
    weights = max(sizes.values(), default=0) if offload else sum(sizes.values())
    need = weights + estimate.cache_total_bytes + estimate.activation_bytes
    logger.info("memory estimate on %s: weights %.1f GiB%s + cache %.1f GiB + activations %.1f GiB = %.1f GiB of %.1f GiB",
                device, weights / GiB, " (offloaded: the largest component)" if offload else "",
                estimate.cache_total_bytes / GiB, estimate.activation_bytes / GiB, need / GiB, capacity / GiB)
    if need <= capacity:
        return
    c = cfg.cache
    hints = []
    if estimate.factor_dtype == "float32":
        hints.append("cache.factor_dtype=bfloat16" if str(c.get("factor_dtype")) != "float32" or cfg.model.dtype == "float32"
                     else "cache.factor_dtype=null (bf16 factors)")
    if c.get("order") and c.get("method") not in (None, "none", "fora") and int(c.order) > 0:
        hints.append(f"cache.order={int(c.order) - 1}")
    if not offload:
        hints.append("model.cpu_offload=true")
    hints.append("a smaller sampling.height/width" + ("/model.call_kwargs.num_frames" if "num_frames" in (cfg.model.get("call_kwargs") or {}) else ""))
    raise SetupError(
        f"model {cfg.model.name} at {cfg.sampling.height}x{cfg.sampling.width} does not fit {device}: weights "
        f"{format_bytes(weights)} + cache {format_bytes(estimate.cache_total_bytes)} ({estimate.forecast_outputs} outputs, "
        f"{estimate.factor_dtype} factors) + activations {format_bytes(estimate.activation_bytes)} = {format_bytes(need)} "
        f"> {format_bytes(capacity)}; try {', or '.join(hints)}")


def check_sr_fits(pipe, model: DictConfig, device: torch.device, hr_sizes: list[tuple[int, int]],
                  caches: list[dict | None]) -> None:
    """`check_fits` for the super-resolution table: the largest HR image under the most demanding variant."""
    capacity = device_capacity(model, device)
    if capacity is None or not hr_sizes:
        return
    height, width = max(hr_sizes, key=lambda s: s[0] * s[1])
    estimates = [hicache.estimate_memory(pipe.transformer, hicache.CacheConfig(**(c or {"method": "none"})), "inf_dit",
                                         height=height, width=width) for c in caches]
    worst = max(estimates, key=lambda e: e.cache_total_bytes + e.activation_bytes)
    weights = sum(component_bytes(pipe).values())
    need = weights + worst.cache_total_bytes + worst.activation_bytes
    if need > capacity:
        raise SetupError(
            f"Inf-DiT at {height}x{width} px does not fit {device}: weights {format_bytes(weights)} + cache "
            f"{format_bytes(worst.cache_total_bytes)} ({worst.factor_dtype} factors; the cache grows with the image's area) "
            f"+ activations {format_bytes(worst.activation_bytes)} = {format_bytes(need)} > {format_bytes(capacity)}; try "
            f"smaller HR images (crop them), bf16 factors, a lower order in sr.variants, or fewer variants with order 2")
