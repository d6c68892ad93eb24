"""The public entry points: attach, describe and remove a cache on a model."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import CacheContext

from .config import TOKEN_METHODS, CacheConfig
from .hooks import (FORECAST_HOOK, HOOK_NAMES, LIVE_CHUNKS_HOOK, SKIP_HOOK, STAND_IN_SHAPE_OF_ROLE, STEP_HOOK, ForecastHook,
                    LiveChunksHook, SkipHook, StepHook, ZeroPool, attach_step_hook, pipeline_loop_starts,
                    pipeline_step_count, register, unregister)
from .memory import MemoryEstimate, estimate_memory
from .recipes import Recipe, get_recipe
from . import fresh_tokens as token_wise

logger = logging.getLogger(__name__)

_HANDLE_ATTR = "_hicache_handle"


@dataclass
class CacheHandle:
    """What `apply_cache` attached to a model, kept on the model for `remove_cache` and the summary."""

    config: CacheConfig
    recipe: Recipe
    step_hook: StepHook | None = None
    step_handle: torch.utils.hooks.RemovableHandle | None = None
    release_handle: torch.utils.hooks.RemovableHandle | None = None
    forecast_hooks: dict[str, ForecastHook] = field(default_factory=dict)
    skip_hooks: dict[str, SkipHook] = field(default_factory=dict)
    live_chunks_hooks: dict[str, LiveChunksHook] = field(default_factory=dict)
    zero_pool: ZeroPool = field(default_factory=ZeroPool)
    fresh_tokens: token_wise.FreshTokenHooks | None = None  # ClusCa's hooks

    def state_managers(self):
        if self.step_hook is not None:
            yield self.step_hook.state_manager
        if self.fresh_tokens is not None:
            yield self.fresh_tokens.clusters
        for hook in (*self.forecast_hooks.values(), *self.skip_hooks.values()):
            yield hook.state_manager


@dataclass
class CacheSummary:
    method: str
    recipe: str
    num_steps: int | None
    full_steps: list[int] | None
    cached_steps: list[int] | None
    ideal_speedup: float | None
    forecast_modules: list[str]
    skip_modules: list[str]
    live_chunks_modules: list[str]
    cache_bytes: int
    full_forwards: int
    cached_forwards: int
    fresh_tokens: dict | None = None  # clusca/hi_clusca: K, gamma, seed and the modules recomputed on K tokens
    factor_dtypes: list[str] = field(default_factory=list)  # of the stored factors (none before a full step)
    estimate: MemoryEstimate | None = None  # predicted before sampling, when a sampling shape is given

    def __str__(self) -> str:
        lines = [f"hicache: method={self.method} recipe={self.recipe}"]
        if self.full_steps is not None:
            lines.append(
                f"  {len(self.full_steps)} full / {len(self.cached_steps)} cached of {self.num_steps} steps "
                f"(ideal speedup {self.ideal_speedup:.2f}x); full at {self.full_steps}"
            )
        lines.append(f"  {len(self.forecast_modules)} forecast modules, {len(self.skip_modules)} skipped modules, "
                     f"{len(self.live_chunks_modules)} linears computing only their live chunks")
        if self.fresh_tokens is not None:
            f = self.fresh_tokens
            lines.append(f"  {len(f['fresh_modules'])} modules recomputed for K={f['clusters']} fresh tokens at cached "
                         f"steps ({len(f['propagating_modules'])} propagating, gamma={f['propagation']}), seed {f['seed']}; "
                         f"clusters from {f['cluster_sources']}")
        dtypes = f", factors in {'/'.join(self.factor_dtypes)}" if self.factor_dtypes else ""
        lines.append(f"  peak cache memory {self.cache_bytes / 2**20:.1f} MiB{dtypes}")
        lines.append(f"  forwards so far: {self.full_forwards} full, {self.cached_forwards} cached")
        if self.estimate is not None:
            lines.append(f"  estimated: {self.estimate}")
        return "\n".join(lines)


def apply_cache(model, config: CacheConfig, recipe: str | Recipe = "flux") -> CacheHandle:
    """Attach the cache described by ``config`` to ``model`` (a diffusers transformer or any module), or to a
    diffusers pipeline's ``transformer``, in which case each call's step count is the pipeline's own (what
    ``final_full_steps`` needs: diffusers pipelines do not put it in their cache context).

    ``recipe`` is a registered name ("flux", ...) or a `Recipe` of forecast and skip regexes (for
    ``method="lesa"``: the name of a registered `hicache.recipes.lesa.LesaRecipe`, or one). Calls of
    ``model`` must run inside a cache context: diffusers pipelines open one (``cache_context("cond")``) for
    `CacheMixin` models; elsewhere use `hicache.cache_context(model, "cond")` around the call or the loop.
    """
    pipe, model = (None, model) if isinstance(model, torch.nn.Module) else (model, _model_of(model))
    if not isinstance(config, CacheConfig):
        raise TypeError(f"config must be a hicache.CacheConfig, got {type(config).__name__}")
    if hasattr(model, _HANDLE_ATTR):
        raise ValueError("hicache is already applied to this model; call hicache.remove_cache(model) first")
    if getattr(model, "is_cache_enabled", False):
        raise ValueError("a diffusers cache is already enabled on this model; call model.disable_cache() first")
    if config.method == "lesa":  # one learned forecast, the whole stack skipped: its own hooks and recipes
        from .lesa_hooks import attach_lesa
        from .recipes.lesa import get_lesa_recipe

        lesa_recipe = get_lesa_recipe(recipe)
        handle = CacheHandle(config=config, recipe=lesa_recipe)
        attach_lesa(model, config, lesa_recipe, handle, pipeline_step_count(pipe) if pipe is not None else None,
                    pipeline_loop_starts(pipe) if pipe is not None else None)
        setattr(model, _HANDLE_ATTR, handle)
        return handle
    recipe = get_recipe(recipe)
    if config.method in TOKEN_METHODS:
        recipe = recipe.for_fresh_tokens()
    handle = CacheHandle(config=config, recipe=recipe)

    if config.method != "none":
        roles = {name: recipe.role(name) for name, _ in model.named_modules() if name}
        forecast = [n for n, r in roles.items() if r == "forecast"]
        skip = [n for n, r in roles.items() if r in STAND_IN_SHAPE_OF_ROLE]
        chunked = [n for n, r in roles.items() if r == "live_chunks"]
        if not forecast:
            raise ValueError(
                f"recipe {recipe.name!r} matches no module of {type(model).__name__} "
                f"(forecast patterns: {', '.join(recipe.forecast)})"
            )
        for pattern in recipe.patterns:
            if not any(re.fullmatch(pattern, n) for n in roles):
                logger.warning("hicache: recipe %r pattern %r matches no module", recipe.name, pattern)
        modules = dict(model.named_modules())
        for name in chunked:  # before any hook is attached: a bad recipe leaves the model untouched
            _check_live_chunks(recipe, name, modules[name])
        if config.method in TOKEN_METHODS:  # checked against the model before any hook is attached
            recipe.refuse_fresh_tokens(model)
            handle.fresh_tokens = token_wise.FreshTokenHooks(config, recipe, modules, forecast)
        handle.step_hook = StepHook(config.schedule, pipeline_step_count(pipe) if pipe is not None else None,
                                    pipeline_loop_starts(pipe) if pipe is not None else None)
        handle.step_handle, handle.release_handle = attach_step_hook(model, handle.step_hook)
        handle.step_hook.on_new_loop = lambda name: _forget_context(handle, name)
        handle.step_hook.on_step_end = lambda name: _note_bytes(handle, name)
        handle.step_hook.on_last_step = lambda name: _release_context(handle, name)
        steps = handle.step_hook.state_manager
        for name in forecast:
            handle.forecast_hooks[name] = (handle.fresh_tokens.forecast_hook(name, steps) if handle.fresh_tokens
                                           else ForecastHook(name, steps, config))
            register(modules[name], handle.forecast_hooks[name], FORECAST_HOOK)
        for name in skip:
            handle.skip_hooks[name] = SkipHook(name, steps, handle.zero_pool, shape=STAND_IN_SHAPE_OF_ROLE[roles[name]])
            register(modules[name], handle.skip_hooks[name], SKIP_HOOK)
        for name in chunked:
            hook = LiveChunksHook(name, steps, handle.zero_pool, *recipe.chunks(name))
            handle.live_chunks_hooks[name] = hook
            register(modules[name], hook, LIVE_CHUNKS_HOOK)
        if handle.fresh_tokens is not None:
            handle.fresh_tokens.attach(modules, steps)
        # Hooks on children stale the registry's cached child list that `cache_context` walks.
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()

    setattr(model, _HANDLE_ATTR, handle)
    return handle


def remove_cache(model) -> None:
    """Detach everything `apply_cache` attached; the model computes exactly as before."""
    model = _model_of(model)
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError("hicache is not applied to this model")
    if handle.step_hook is not None:
        handle.step_handle.remove()
        handle.release_handle.remove()
        for module in model.modules():
            for name in HOOK_NAMES + token_wise.HOOK_NAMES:
                unregister(module, name)
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    delattr(model, _HANDLE_ATTR)


def reset_cache(model) -> None:
    """Forget every context's step counter and history, so the next call starts a fresh sampling loop.

    Rarely needed: diffusers pipelines reset `CacheMixin` models at the end of each call, and the step hook
    starts afresh when a new loop begins (``step_index=0`` in the cache context, or a timestep that moves back
    up). Call it between loops that give neither, e.g. a custom loop over a model without a ``timestep``
    argument, or before reusing a model whose last call was interrupted under such a loop.
    """
    handle = _handle(model)
    for manager in handle.state_managers():
        try:
            context = manager.context
        except ValueError:  # no context open
            context = None
        manager.reset()
        manager.set_context(context)  # called inside a context: the next forward still runs in it
    for hook in handle.forecast_hooks.values():
        hook._bytes.clear()
    handle.zero_pool.clear()


def cache_summary(model, num_inference_steps: int | None = None, *, height: int | None = None,
                  width: int | None = None, frames: int | None = None, **estimate_kwargs) -> CacheSummary:
    """Full and cached steps, hooked modules and peak cache memory of the cache on ``model``; the step count is
    the one given, else the config's, else that of the last call that ran.

    With ``height`` and ``width`` (and ``frames`` for video) the summary also predicts the memory of sampling at
    that size (`hicache.estimate_memory`, on a meta twin of the model: nothing runs, no memory is allocated),
    so it can be read before the first step; ``estimate_kwargs`` go to it (``batch``, ``contexts``,
    ``text_tokens``, ``vae_scale_factor``).
    """
    handle = _handle(model)
    cfg = handle.config
    n = num_inference_steps or cfg.num_inference_steps or (handle.step_hook.last_num_steps if handle.step_hook else None)
    full = cached = speedup = None
    if n is not None:
        if cfg.method == "none":
            full, cached = list(range(n)), []
        else:
            full = cfg.schedule.full_steps_for(n)
            cached = [s for s in range(n) if s not in set(full)]
        speedup = n / len(full)
    return CacheSummary(
        method=cfg.method,
        recipe=handle.recipe.name,
        num_steps=n,
        full_steps=full,
        cached_steps=cached,
        ideal_speedup=speedup,
        forecast_modules=list(handle.forecast_hooks),
        skip_modules=list(handle.skip_hooks),
        live_chunks_modules=list(handle.live_chunks_hooks),
        cache_bytes=sum(h.peak_bytes for h in handle.forecast_hooks.values()) + handle.zero_pool.nbytes,
        full_forwards=handle.step_hook.full_forwards if handle.step_hook else 0,
        cached_forwards=handle.step_hook.cached_forwards if handle.step_hook else 0,
        fresh_tokens=handle.fresh_tokens.describe() if handle.fresh_tokens else None,
        factor_dtypes=_factor_dtypes(handle),
        estimate=None if height is None or width is None else estimate_memory(
            _model_of(model), cfg, handle.recipe, height=height, width=width, frames=frames, **estimate_kwargs),
    )


def _factor_dtypes(handle: CacheHandle) -> list[str]:
    dtypes = {str(term.dtype).removeprefix("torch.")
              for hook in handle.forecast_hooks.values()
              for state in hook.state_manager._state_cache.values()
              for history in state.histories or () if history is not None
              for term in history._terms}
    return sorted(dtypes)


@contextmanager
def cache_context(model, name: str, **kwargs):
    """The cache context for models that are not diffusers `CacheMixin`s (toy modules, custom loops)."""
    handle = _handle(model)
    context = CacheContext(name, **kwargs)
    managers = list(handle.state_managers())
    for manager in managers:
        manager.set_context(context)
    try:
        yield
    finally:
        for manager in managers:
            manager.set_context(None)


def _check_live_chunks(recipe: Recipe, name: str, module: torch.nn.Module) -> None:
    num_chunks, _ = recipe.chunks(name)
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"recipe {recipe.name!r}: live_chunks module {name!r} is a {type(module).__name__}, "
                         "not a torch.nn.Linear")
    if module.out_features % num_chunks:
        raise ValueError(f"recipe {recipe.name!r}: live_chunks module {name!r} has {module.out_features} outputs, "
                         f"not divisible into {num_chunks} chunks")


def _forget_context(handle: CacheHandle, name: str) -> None:
    """A new sampling loop in one context: nothing its forecast and skip hooks recorded in the last one applies."""
    for hook in (*handle.forecast_hooks.values(), *handle.skip_hooks.values()):
        hook.state_manager._state_cache.pop(name, None)


def _note_bytes(handle: CacheHandle, name: str) -> None:
    for hook in handle.forecast_hooks.values():
        hook.note_bytes(name)


def _release_context(handle: CacheHandle, name: str) -> None:
    """Drop one context's histories after its last step (the peak stays in the summary)."""
    for hook in handle.forecast_hooks.values():
        hook.state_manager._state_cache.pop(name, None)


def _model_of(obj) -> torch.nn.Module:
    """The model itself, or a pipeline's ``transformer``."""
    if isinstance(obj, torch.nn.Module):
        return obj
    transformer = getattr(obj, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise ValueError(f"hicache caches a torch.nn.Module or a pipeline's .transformer; got a {type(obj).__name__}")
    return transformer


def _handle(model) -> CacheHandle:
    handle = getattr(_model_of(model), _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError("hicache is not applied to this model; call hicache.apply_cache first")
    return handle
