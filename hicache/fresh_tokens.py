"""ClusCa and Hi-ClusCa on the caching core: hooks that recompute a few tokens at cached steps.

Token-wise methods keep the TaylorSeer/HiCache schedule, history and forecast and add, at cached
steps, one fresh token per cluster for the recipe's `FreshTokens` modules (FLUX: each double-stream
block's image and text MLP). Three hooks, one concern each, sharing one `ClusterState` per cache
context through a `StateManager`:

- `ClusterSourceHook` (``clusca`` only) on the recipe's `ClusterSource` module (FLUX: the last
  double-stream block) clusters each stream with K-means at every full step, warm-started from the
  previous centroids.
- `SelectTokensHook` on a ``select`` module (FLUX: ``norm2``/``norm2_context``) at a cached step
  draws one token per cluster from its input and runs the module on those K rows only, so the MLP
  behind it receives K tokens. Where the stream has no assignment yet (``hi_clusca``: at the first
  cached step, in the first block), it clusters its own input first, once per image.
- `FreshTokensHook` on the MLP (a `ForecastHook`) computes the K tokens, writes them into its D0 (and
  for propagating modules pulls every token of a cluster towards them, `hicache.clusters`), then
  returns the forecast from the updated D0. The updated D0 persists: the next full step's first
  difference is taken against it.

Randomness: one CPU `torch.Generator` per cache context, seeded with ``config.seed`` when the context's
state starts, i.e. at the start of every sampling loop (pipelines reset the hooks' state at the end of
each call, and the step hook starts a new loop by itself: `hooks.StepHook.starts_new_loop`). Draws come in the official order: K-means initial rows where a clustering has
no centroids (image before text), then one ``rand(B, N)`` per selection, block by block, ``ff`` before
``ff_context``. The official code uses the unseeded global RNG instead (a deliberate divergence).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

from . import clusters as C
from .config import CacheConfig
from .hooks import ForecastHook, current_step, register
from .recipes import ClusterSource, FreshTokens, Recipe

SELECT_HOOK = "hicache_select_tokens"
CLUSTER_SOURCE_HOOK = "hicache_cluster_source"
HOOK_NAMES = (SELECT_HOOK, CLUSTER_SOURCE_HOOK)
# whether the method clusters at full steps on the recipe's cluster sources (else lazily, once per image)
CLUSTERS_AT_FULL_STEPS = {"clusca": True, "hi_clusca": False}


class ClusterState(BaseState):
    """One cache context's clusters, generator and the fresh indices handed from select to MLP hooks."""

    def __init__(self, seed: int):
        self.seed = seed
        self.loop: int | None = None  # the sampling loop (`hooks.StepState.loop`) these clusters belong to
        self.reset()

    def reset(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        self.labels: dict[str, torch.Tensor] = {}
        self.centroids: dict[str, torch.Tensor] = {}
        self.pending: dict[int, torch.Tensor] = {}
        self.clusterings: list[tuple[int, str, str]] = []  # (step, stream, where): for inspection and tests

    def cluster(self, x: torch.Tensor, stream: str, num_clusters: int, step: int, where: str) -> None:
        """K-means on ``x`` [B, N, D], warm-started from the stream's centroids where their shape fits."""
        x = x.detach()
        warm = self.centroids.get(stream)
        if warm is not None and (warm.shape[0] != x.shape[0] or warm.shape[2] != x.shape[2]):
            warm = None
        self.labels[stream], self.centroids[stream] = C.kmeans(x, num_clusters, warm, self.generator)
        self.clusterings.append((step, stream, where))


def loop_state(clusters: StateManager, step) -> ClusterState:
    """The context's `ClusterState`, started afresh (generator reseeded) when a new sampling loop began."""
    state: ClusterState = clusters.get_state()
    if state.loop != step.loop:
        state.reset()
        state.loop = step.loop
    return state


class ClusterSourceHook(ModelHook):
    """At full steps, cluster each of its streams on one element of the module's output (ClusCa)."""

    _is_stateful = True

    def __init__(self, module_name: str, steps: StateManager, clusters: StateManager,
                 sources: list[ClusterSource], num_clusters: int):
        super().__init__()
        self.module_name = module_name
        self.steps = steps
        self.clusters = clusters
        self.sources = sources
        self.num_clusters = num_clusters

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        step = current_step(self.steps, self.module_name)
        if step.is_full:
            state = loop_state(self.clusters, step)
            for source in self.sources:
                state.cluster(_element(output, source.output, self.module_name), source.stream, self.num_clusters,
                              step.step, self.module_name)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.clusters.reset()
        return module


class SelectTokensHook(ModelHook):
    """At cached steps, run a token-wise module on one drawn token per cluster of its input only."""

    _is_stateful = True

    def __init__(self, module_name: str, steps: StateManager, clusters: StateManager, spec: FreshTokens,
                 key: int, num_clusters: int):
        super().__init__()
        self.module_name = module_name
        self.steps = steps
        self.clusters = clusters
        self.spec = spec
        self.key = key
        self.num_clusters = num_clusters

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        step = current_step(self.steps, self.module_name)
        if step.is_full:
            return self.fn_ref.original_forward(*args, **kwargs)
        if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
            raise ValueError(f"hicache: fresh-token select module {self.module_name!r} must be called with the tokens "
                             f"[batch, tokens, channels] as its first positional input")
        x = args[0]
        state = loop_state(self.clusters, step)
        labels = state.labels.get(self.spec.stream)
        if labels is None or labels.shape != x.shape[:2]:
            state.cluster(x, self.spec.stream, self.num_clusters, step.step, self.module_name)
            labels = state.labels[self.spec.stream]
        indices = C.draw_fresh(labels, self.num_clusters, state.generator)
        state.pending[self.key] = indices
        rows = C.gather_tokens(x, indices)
        return self.fn_ref.original_forward(rows, *args[1:], **kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.clusters.reset()
        return module


class FreshTokensHook(ForecastHook):
    """A `ForecastHook` that, at cached steps, computes the module for the K selected tokens, writes them
    into D0 (with propagation if the recipe says so) and forecasts from the updated D0."""

    def __init__(self, module_name: str, steps: StateManager, config: CacheConfig, clusters: StateManager,
                 spec: FreshTokens, key: int):
        super().__init__(module_name, steps, config)
        self.clusters = clusters
        self.spec = spec
        self.key = key
        self.num_clusters = config.clusters
        self.gamma = float(config.propagation) if spec.propagate else 0.0

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        step = current_step(self.steps, self.module_name)
        if step.is_full:
            return super().new_forward(module, *args, **kwargs)
        clusters = loop_state(self.clusters, step)
        indices = clusters.pending.pop(self.key, None)
        if indices is None:
            raise RuntimeError(f"hicache: {self.module_name!r} got no fresh tokens at a cached step; its select "
                               f"module ({self.spec.select}) must run just before it")
        fresh = self.fn_ref.original_forward(*args, **kwargs)
        state = self.state_manager.get_state()
        if state.histories is None or len(state.histories) != 1 or not isinstance(fresh, torch.Tensor):
            raise RuntimeError(f"hicache: fresh-token module {self.module_name!r} must return one tensor")
        history = state.histories[0]
        if fresh.shape != indices.shape + history.d0.shape[-1:]:
            raise RuntimeError(f"hicache: {self.module_name!r} returned {tuple(fresh.shape)} for "
                               f"{indices.shape[1]} fresh tokens")
        labels = clusters.labels[self.spec.stream]
        history.replace_d0(C.propagate_fresh(history.d0, indices, fresh, labels, self.num_clusters, self.gamma))
        return state.forecast(step.position, self.module_name)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.clusters.reset()
        return super().reset_state(module)


def _element(output: Any, index: int, module_name: str) -> torch.Tensor:
    try:
        x = output[index] if isinstance(output, (tuple, list)) else (output if index == 0 else None)
    except IndexError:
        x = None
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"hicache: cluster source {module_name!r} has no [batch, tokens, channels] tensor at output "
                         f"{index}")
    return x


class FreshTokenHooks:
    """The token-wise hooks of one model: planned (and the recipe checked against the model) before any hook is
    attached, so a bad recipe leaves the model untouched; then built by `hicache.apply_cache`."""

    def __init__(self, config: CacheConfig, recipe: Recipe, modules: dict[str, torch.nn.Module],
                 forecast: list[str]):
        if config.method not in CLUSTERS_AT_FULL_STEPS:
            raise ValueError(f"{config.method!r} is not a token-wise method")
        self.config = config
        self.recipe = recipe
        self.clusters = StateManager(ClusterState, init_args=(config.seed,))
        self.fresh_modules: dict[str, tuple[int, FreshTokens]] = {}
        self.selects: dict[str, tuple[int, FreshTokens]] = {}
        for key, spec in enumerate(recipe.fresh_tokens):
            fresh = [n for n in forecast if re.fullmatch(spec.module, n)]
            selects = [n for n in modules if n and re.fullmatch(spec.select, n)]
            if not fresh or len(selects) != len(fresh):
                raise ValueError(f"recipe {recipe.name!r}: fresh tokens for {spec.module!r} match {len(fresh)} forecast "
                                 f"modules but {len(selects)} select modules ({spec.select!r})")
            for name in selects:
                if recipe.role(name) is not None:
                    raise ValueError(f"recipe {recipe.name!r}: select module {name!r} also has the role {recipe.role(name)}")
            self.fresh_modules.update({n: (key, spec) for n in fresh if n not in self.fresh_modules})
            self.selects.update({n: (key, spec) for n in selects})
        order = {n: i for i, n in enumerate(modules)}  # model order, for the summary
        self.fresh_modules = dict(sorted(self.fresh_modules.items(), key=lambda item: order[item[0]]))
        self.selects = dict(sorted(self.selects.items(), key=lambda item: order[item[0]]))
        self.sources: dict[str, list[ClusterSource]] = {}
        if CLUSTERS_AT_FULL_STEPS[config.method]:
            missing = {f.stream for f in recipe.fresh_tokens} - {s.stream for s in recipe.cluster_sources}
            if missing:
                raise ValueError(f"recipe {recipe.name!r} has no cluster source for stream(s) {', '.join(sorted(missing))}")
            for source in recipe.cluster_sources:
                matches = [n for n in modules if n and re.fullmatch(source.module, n)]
                if not matches:
                    raise ValueError(f"recipe {recipe.name!r}: cluster source {source.module!r} matches no module")
                self.sources.setdefault(matches[-1], []).append(source)
        self.select_hooks: dict[str, SelectTokensHook] = {}
        self.source_hooks: dict[str, ClusterSourceHook] = {}

    def forecast_hook(self, name: str, steps: StateManager) -> ForecastHook:
        """The forecast hook of a forecast module: a `FreshTokensHook` where the recipe recomputes it."""
        if name not in self.fresh_modules:
            return ForecastHook(name, steps, self.config)
        key, spec = self.fresh_modules[name]
        return FreshTokensHook(name, steps, self.config, self.clusters, spec, key)

    def attach(self, modules: dict[str, torch.nn.Module], steps: StateManager) -> None:
        """The select hooks, and (ClusCa) the cluster-source hooks."""
        k = self.config.clusters
        for name, (key, spec) in self.selects.items():
            self.select_hooks[name] = SelectTokensHook(name, steps, self.clusters, spec, key, k)
            register(modules[name], self.select_hooks[name], SELECT_HOOK)
        for name, sources in self.sources.items():
            self.source_hooks[name] = ClusterSourceHook(name, steps, self.clusters, sources, k)
            register(modules[name], self.source_hooks[name], CLUSTER_SOURCE_HOOK)

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "clusters": cfg.clusters, "propagation": cfg.propagation, "seed": cfg.seed,
            "fresh_modules": list(self.fresh_modules),
            "propagating_modules": [n for n, (_, s) in self.fresh_modules.items() if s.propagate],
            "select_modules": list(self.selects),
            "cluster_sources": list(self.sources) if self.sources else "the first select module, at the first cached step",
        }
